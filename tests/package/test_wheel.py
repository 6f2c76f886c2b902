"""Release packaging: the wheel that ``python -m build`` makes works from a fresh venv, not from this checkout.

The build runs on a copy of the working tree (so the checkout gets no build/ or egg-info), sdist first and the wheel
from the sdist, as a release does. The fresh venv gets the wheel with ``--no-deps``; the heavy dependencies (torch,
nnunetv2, ...) already installed for the tests are made visible by a ``.pth`` file that lists their site-packages
folder. A folder named in a ``.pth`` file is only appended to ``sys.path``: the ``.pth`` files inside it (this
checkout's editable install among them) are not processed, so nothing can resolve to the checkout. Everything runs in
subprocesses whose working directory lies outside the checkout.
"""
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from helpers import REPO_ROOT

ROOT = REPO_ROOT
PACKAGES = ("med3dinsight_plugin", "nnunet_trainers")
NOT_SOURCES = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache")


def _run(cmd, **kwargs):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)


def _copy_sources(dst: Path) -> None:
    """The working tree as a release would see it: tracked and untracked-but-not-ignored files (all of the tree,
    less build outputs and virtual environments, where git is unavailable)."""
    listed = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]) \
        if shutil.which("git") and (ROOT / ".git").exists() else None
    if listed is None or listed.returncode != 0:
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(*NOT_SOURCES))
        return
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of it
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dst / name)


def _build(src: Path, out: Path) -> tuple[Path, Path]:
    """sdist, then the wheel from the sdist. Isolated as pip does it (setuptools from the package index); where no
    index can be reached, the same build without isolation, with this environment's setuptools."""
    isolated = _run([sys.executable, "-m", "build", "--outdir", out, src])
    if isolated.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        plain = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src])
        if plain.returncode != 0:
            if importlib.util.find_spec("setuptools") is None:
                pytest.skip("cannot build offline: the isolated build could not install its build requirements "
                            f"({isolated.stderr.strip()[-300:]}) and this environment has no setuptools")
            pytest.fail(f"python -m build failed.\nisolated:\n{isolated.stdout[-3000:]}{isolated.stderr[-3000:]}\n"
                        f"--no-isolation:\n{plain.stdout[-3000:]}{plain.stderr[-3000:]}")
        warnings.warn("the isolated build failed, the --no-isolation one passed: "
                      f"{isolated.stderr.strip()[-300:]}", stacklevel=2)
    sdists, wheels = sorted(out.glob("med3dinsight-*.tar.gz")), sorted(out.glob("med3dinsight-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return sdists[0], wheels[0]


# Runs in the fresh venv (cwd outside the checkout): where everything comes from, and nnU-Net's own trainer lookup.
CHECK = r"""
import importlib.metadata, inspect, json, os, sys, warnings
warnings.simplefilter("always")
import med3dinsight_plugin, nnunet_trainers
import nnunetv2
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

trainer = recursive_find_trainer_class_by_name("Med3DInsightTrainer")  # what nnUNetv2_train -tr calls
distribution = importlib.metadata.distribution("med3dinsight")
print(json.dumps({
    "plugin": med3dinsight_plugin.__file__, "trainers": nnunet_trainers.__file__,
    "trainer_file": inspect.getfile(trainer), "trainer_module": trainer.__module__,
    "is_nnunet_trainer": issubclass(trainer, nnUNetTrainer), "nnunetv2": nnunetv2.__file__,
    "version": med3dinsight_plugin.__version__, "distribution_version": distribution.version,
    "distribution_at": str(distribution.locate_file("")),
    "editable": [m for m in sys.modules if "editable" in m] + [repr(f) for f in sys.meta_path if "editable" in repr(f)],
    "sys_path": sys.path,
}))
"""


def _inside(path, folder) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@pytest.mark.slow
@pytest.mark.nnunet  # nnU-Net's own trainer lookup in a fresh venv
def test_wheel_installs_into_a_fresh_venv_and_nnunet_finds_its_trainers(tmp_path):
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (it is in the test extra: pip install -e '.[test]')")
    src, out, home = tmp_path / "src", tmp_path / "dist", tmp_path / "elsewhere"
    home.mkdir()
    _copy_sources(src)
    sdist, wheel = _build(src, out)

    # what a release ships: the license in both archives, the citation file and the docs/ pages in the sdist, every
    # module and every non-Python file of the two packages in the wheel (a subpackage find: misses, or data nobody
    # declared, fails here)
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "CITATION.cff", "README.md", "setup.cfg", "pyproject.toml"} <= in_sdist
    docs = {p.relative_to(src).as_posix() for p in (src / "docs").glob("*.md")}  # the pages the README links to
    assert "docs/README.md" in docs and docs <= in_sdist, sorted(docs - in_sdist)
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in in_wheel if n.split("/")[0].endswith(".dist-info"))
        license_text = archive.read(f"{dist_info}/licenses/LICENSE")
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert license_text == (ROOT / "LICENSE").read_bytes() and b"Apache License" in license_text
    assert "License: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "med3dinsight = med3dinsight_plugin.cli:main" in entry_points
    sources = {p.relative_to(src).as_posix() for package in PACKAGES for p in (src / package).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert "nnunet_trainers/ext/med3dinsight_trainers.py" in sources
    assert sources <= in_wheel, sorted(sources - in_wheel)
    assert not {n for n in in_wheel if n.split("/")[0] not in (*PACKAGES, dist_info)}, "stray top-level files"

    # a fresh venv: the wheel, plus the already-installed dependencies through a .pth file
    venv = tmp_path / "fresh"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    dependencies = [p for p in site.getsitepackages() if Path(p).is_dir()]
    assert dependencies and not any(_inside(p, ROOT) and not _inside(p, ROOT / ".venv") for p in dependencies)
    (purelib / "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in dependencies))
    installed = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    assert installed.returncode == 0, installed.stdout + installed.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                                                            "nnUNet_extTrainer", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1")
    shim = purelib / "nnunet_trainers" / "ext"

    # the console script of the wheel prints the shim inside the fresh venv
    printed = _run([venv / "bin" / "med3dinsight", "nnunet-env"], cwd=home, env=env)
    assert printed.returncode == 0, printed.stderr
    line = printed.stdout.strip()
    assert line.startswith("export nnUNet_extTrainer="), line
    ext_trainer = line.split("=", 1)[1].strip("'")
    assert Path(ext_trainer).resolve() == shim.resolve(), (ext_trainer, shim)

    # nnU-Net's own lookup through nnUNet_extTrainer finds the trainer, imported from the wheel
    checked = _run([python, "-c", CHECK], cwd=home, env={**env, "nnUNet_extTrainer": ext_trainer})
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "could not be imported" not in checked.stderr, checked.stderr[-3000:]
    assert f"Using trainer 'Med3DInsightTrainer' from: {ext_trainer}" in checked.stdout, checked.stdout[-3000:]
    found = json.loads(checked.stdout.strip().splitlines()[-1])
    for key in ("plugin", "trainers", "trainer_file"):
        assert _inside(found[key], purelib) and not _inside(found[key], ROOT), (key, found[key])
    assert found["trainer_file"].endswith(os.path.join("nnunet_trainers", "trainers.py"))
    assert found["trainer_module"] == "nnunet_trainers.trainers" and found["is_nnunet_trainer"]
    assert _inside(found["distribution_at"], purelib), found["distribution_at"]
    assert found["version"] == found["distribution_version"] and f"-{found['version']}-" in wheel.name
    assert not found["editable"], found["editable"]
    assert not [p for p in found["sys_path"] if p and (_inside(p, ROOT) and not _inside(p, ROOT / ".venv"))]
    # the dependencies came from the shared site-packages folder, not from anything in the wheel
    assert any(_inside(found["nnunetv2"], p) for p in dependencies), found["nnunetv2"]
    # and the module nnU-Net imported is the one that was built
    assert Path(found["trainer_file"]).read_bytes() == (src / "nnunet_trainers" / "trainers.py").read_bytes()
