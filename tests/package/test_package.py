"""Packaging promises: a light core import and the documented layout."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

ROOT = REPO_ROOT


@pytest.mark.slow
def test_core_import_pulls_in_no_framework():
    # every module, adapters included, imports its framework only when used
    code = ("import sys, med3dinsight_plugin, nnunet_trainers, med3dinsight_plugin.cli, med3dinsight_plugin.demo, "
            "med3dinsight_plugin.volumes, med3dinsight_plugin.slices, med3dinsight_plugin.teacher.captioner, "
            "med3dinsight_plugin.teacher.clip, med3dinsight_plugin.teacher.embed, med3dinsight_plugin.pretrain.run, "
            "med3dinsight_plugin.pretrain.engine; "
            "heavy = [m for m in ('monai', 'nnunetv2', 'open_clip', 'transformers', 'batchgenerators', 'ot', "
            "'dynamic_network_architectures', 'SimpleITK', 'nibabel', 'tensorboard', 'matplotlib') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_layout_promised_to_users():
    for path in ("med3dinsight_plugin", "nnunet_trainers", "examples", "tests", "benchmarks", "setup.cfg",
                 "pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / path).exists(), path


def test_public_api():
    import med3dinsight_plugin as m

    for name in ("PlaneSliceAwareTransformer", "build_backbone", "Med3DInsightModel", "Med3DInsightLoss",
                 "clip_loss"):
        assert hasattr(m, name)
    from med3dinsight_plugin.alignment import clip_loss  # noqa: F401
    from med3dinsight_plugin.ot import entropic_partial_wasserstein  # noqa: F401


def test_ci_runs_exactly_the_readme_test_command_and_the_tree_is_lint_clean():
    """``.ci/run`` runs the README's quick-start test command verbatim, and that command's lint step passes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines()
                   if line.startswith("python3 -m venv .venv") and "pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "ruff check ." in command
    ruff = Path(sys.executable).parent / "ruff"  # installed by the test extra
    r = subprocess.run([str(ruff), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
