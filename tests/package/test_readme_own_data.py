"""The own-data examples of docs/own_data.md run as written, on generated data.

Each bash block is taken from docs/own_data.md (the page the README links to for your own data) and run line by line
in bash. Only what a test machine cannot have is replaced, each replacement listed next to its test and checked to
apply. The full route (under "The full route"): the data folders, the 7B captioning model (a tiny random LLaVA saved
locally), BiomedCLIP (a tiny random open_clip model, added as ``--clip-model``), 8/4 GPUs (one process) and 20000
steps (2). The CPU/offline first run (under "A first run on a CPU"): the data folder and 20 steps (2); it builds its
own tiny teachers. Everything else -- commands, flags, the order of the steps, which dataset each step reads -- is
the page's.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT
from med3dinsight_plugin.pretrain import load_config
from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
from med3dinsight_plugin.teacher.cache import TeacherCache, read_manifest
from med3dinsight_plugin.teacher.tiny import save_tiny_llava, save_tiny_open_clip

PAGE = REPO_ROOT / "docs" / "own_data.md"


def _block(heading: str, language: str = "bash") -> str:
    """The first ``language`` code block after the section whose heading starts with ``heading``."""
    text = PAGE.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}")
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    assert match, f"no {language} block under '{heading}' in {PAGE}"
    return match.group(1)


def _substitute(script: str, substitutions) -> str:
    for old, new in substitutions:
        assert old in script, f"the docs example no longer contains {old!r}: update this test's substitutions"
        script = script.replace(old, new)
    return script


def _run_bash(script: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with it
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.nnunet
def test_readme_own_data_example_runs_as_written(tmp_path):
    vlm = save_tiny_llava(tmp_path / "vlm")
    clip = save_tiny_open_clip(tmp_path / "clip")
    write_nnunet_raw_dataset(tmp_path / "raw", dataset_id=42, name="Abdomen", cases=3, shape=(32, 32, 32), ct=True)
    script = _substitute(_block("The full route"), [
        ("/data/nnUNet_raw", str(tmp_path / "raw")),
        ("/data/nnUNet_preprocessed", str(tmp_path / "pre")),
        ("/data/nnUNet_results", str(tmp_path / "results")),
        ("FreedomIntelligence/HuatuoGPT-Vision-7B-Qwen2.5VL", str(vlm)),
        ("embed $DATA", f"embed --clip-model {clip} $DATA"),
        ("--nproc_per_node 8", "--nproc_per_node 1"),
        ("--nproc_per_node 4", "--nproc_per_node 1"),
        ("train.steps=20000", "train.steps=2"),
    ])
    _run_bash(script, tmp_path)
    # every step left its output, and the cache describes the preprocessed dataset with raw-HU renders
    assert sorted(p.name for p in (tmp_path / "slices_png").iterdir())
    assert (tmp_path / "captions.jsonl").stat().st_size > 0
    cache = TeacherCache(tmp_path / "cache")
    assert cache.has_text and len(cache.cases) == 3
    source = read_manifest(tmp_path / "cache")["settings"]["source"]
    assert (source["kind"], source["scanner_units"]) == ("nnunet_preprocessed", "raw")
    assert (tmp_path / "runs" / "abdomen" / "checkpoints").is_dir()
    assert list((tmp_path / "runs" / "abdomen").glob("*.safetensors"))


def test_own_data_run_yaml_is_the_commands_configuration():
    """The page's run.yaml (for the Python example) holds what the full route's pretrain command sets, and loads."""
    values = yaml.safe_load(_block("The same from Python", "yaml"))
    config = load_config(None, [f"{section}.{key}={value}" for section, keys in values.items()
                                for key, value in keys.items()])
    command = _block("The full route")
    assert f"--backbone {config.model.backbone}" in command and f"model.psat={config.model.psat}" in command
    assert f"train.steps={config.train.steps}" in command and f"train.batch_size={config.train.batch_size}" in command


@pytest.mark.slow
@pytest.mark.nnunet
def test_own_data_cpu_offline_route_runs_as_written(tmp_path):
    """The CPU/offline first run on a folder of NIfTI volumes: the tiny teachers it builds, every command's output."""
    images = write_nnunet_raw_dataset(tmp_path / "raw", dataset_id=7, name="MyCT", cases=3, shape=(48, 48, 48),
                                      ct=True) / "imagesTr"
    script = _substitute(_block("A first run on a CPU"), [
        ("DATA=/data/my_ct", f"DATA={images}"),
        ("train.steps=20", "train.steps=2"),
    ])
    _run_bash(script, tmp_path)
    assert (tmp_path / "teachers" / "tiny-clip" / "open_clip_config.json").is_file()
    assert list((tmp_path / "slices_png").iterdir())
    assert (tmp_path / "captions.jsonl").stat().st_size > 0
    cache = TeacherCache(tmp_path / "cache")
    assert cache.has_text and len(cache.cases) == 3
    assert read_manifest(tmp_path / "cache")["settings"]["source"]["kind"] == "nifti"
    run = tmp_path / "runs" / "cpu"
    assert (run / "med3dinsight.safetensors").is_file() and (run / "metrics.png").is_file()
    assert load_config(run / "config.yaml").model.patch_size == [64, 64, 64]
