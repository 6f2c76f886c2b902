"""Layers, enforced: the import-linter contracts in setup.cfg hold (no cycle, no upward import, no framework in the
core), every module sits in a layer, and our own modules are imported at the top of each module.

Each check is also run on a copy of the package with one violation planted, so a check that stopped looking would
fail here too.
"""
import ast
import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from helpers import REPO_ROOT

PACKAGES = ("med3dinsight_plugin", "nnunet_trainers")
# Function-local imports of our own modules are allowed only where they keep a heavy framework out of an import:
# the CLI (the top layer, imported by nothing) imports each command's code when that command runs, so that
# `med3dinsight --help` does not import torch (tests/package/test_cli.py); the modules that import MONAI's engines or
# nnU-Net at their top are imported where they are used.
LAZY_MODULES = {"med3dinsight_plugin.cli"}
HEAVY_OWN_MODULES = {"med3dinsight_plugin.monai_support", "nnunet_trainers.trainers"}


def _lint(root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """import-linter on the packages found first on the path from ``root``, with ``root``'s setup.cfg."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(root / 'setup.cfg')!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports_below_the_top(root: Path) -> List[str]:
    """``module:line: import`` for each import of our own packages inside a function or class body, except the
    allowed ones (:data:`LAZY_MODULES`, :data:`HEAVY_OWN_MODULES`)."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(root, path)
            tree = ast.parse(path.read_text(), str(path))
            top = set()
            stack = list(tree.body)
            while stack:  # module level, including the bodies of if/try at module level (TYPE_CHECKING)
                node = stack.pop()
                top.add(id(node))
                if isinstance(node, (ast.If, ast.Try)):
                    stack += node.body + node.orelse + getattr(node, "finalbody", [])
                    stack += [s for h in getattr(node, "handlers", []) for s in h.body]
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom) or id(node) in top:
                    continue
                if node.level:
                    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith(PACKAGES) or module in LAZY_MODULES or target in HEAVY_OWN_MODULES:
                    continue
                found.append(f"{module}:{node.lineno}: from {target} import {', '.join(a.name for a in node.names)}")
    return found


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "setup.cfg", root / "setup.cfg")
    return root


def _plant(root: Path, module: str, line: str) -> None:
    path = root.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    assert path.is_file(), path
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_the_import_contracts_hold(tmp_path):
    r = _lint(REPO_ROOT, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("plants, contract", [
    ([("med3dinsight_plugin.psat", "from .pretrain import build_model")], "Layers"),  # the core reaching up
    ([("med3dinsight_plugin.checkpoint.reading", "from nnunet_trainers import attach")], "Layers"),  # below an adapter
    ([("med3dinsight_plugin.ot", "from .planes import PLANES"),  # two modules of one layer importing each other
      ("med3dinsight_plugin.planes", "from .ot import entropic_partial_wasserstein")], "No import cycles"),
    ([("med3dinsight_plugin.alignment", "import transformers")], "The core imports no framework"),
])
def test_a_planted_violation_breaks_its_contract(tmp_path, plants, contract):
    root = _copy(tmp_path)
    for module, line in plants:
        _plant(root, module, line)
    r = _lint(root, tmp_path)
    assert r.returncode != 0, r.stdout
    broken = [ln for ln in r.stdout.splitlines() if "BROKEN" in ln]
    assert any(b.startswith(contract) for b in broken), r.stdout


def test_every_module_sits_in_a_layer():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    named = {name.strip() for line in config["importlinter:contract:layers"]["layers"].split("\n")
             for name in line.replace("|", ":").split(":") if name.strip()}
    children = {f"med3dinsight_plugin.{p.stem}" for p in (REPO_ROOT / "med3dinsight_plugin").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert children - named == set(), "add these modules to a layer in setup.cfg [importlinter:contract:layers]"
    assert named - children - {"nnunet_trainers"} == set(), "setup.cfg names modules that do not exist"


def test_own_modules_are_imported_at_the_top():
    assert own_imports_below_the_top(REPO_ROOT) == []


def test_an_own_import_inside_a_function_is_found(tmp_path):
    root = _copy(tmp_path)
    _plant(root, "med3dinsight_plugin.loading", "from .checkpoint import load_checkpoint")
    _plant(root, "med3dinsight_plugin.demo", "from .monai_support import Med3DInsightSupervisedTrainer")  # allowed
    _plant(root, "med3dinsight_plugin.cli", "from .pretrain import run_pretraining")  # allowed: the CLI
    found = own_imports_below_the_top(root)
    assert len(found) == 1 and found[0].startswith("med3dinsight_plugin.loading:")
    assert found[0].endswith("from med3dinsight_plugin.checkpoint import load_checkpoint")
