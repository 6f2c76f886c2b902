"""The README's own-data example runs as written, on a generated nnU-Net dataset.

The bash block under "Your own data" is taken from README.md and run line by line in bash. Only what a test machine
cannot have is replaced, each replacement listed in ``SUBSTITUTIONS`` and checked to apply: the data folders, the
7B captioning model (a tiny random LLaVA saved locally), BiomedCLIP (a tiny random open_clip model, added as
``--clip-model``), 8/4 GPUs (one process) and 20000 steps (2). Everything else -- commands, flags, the order of the
steps, which dataset each step reads -- is the README's.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
from med3dinsight_plugin.teacher.cache import TeacherCache, read_manifest
from med3dinsight_plugin.teacher.tiny import save_tiny_llava, save_tiny_open_clip

README = Path(__file__).resolve().parents[1] / "README.md"


def _block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Your own data"):]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "no bash block under 'Your own data' in README.md"
    return match.group(1)


def test_readme_own_data_example_runs_as_written(tmp_path):
    vlm = save_tiny_llava(tmp_path / "vlm")
    clip = save_tiny_open_clip(tmp_path / "clip")
    write_nnunet_raw_dataset(tmp_path / "raw", dataset_id=42, name="Abdomen", cases=3, shape=(32, 32, 32), ct=True)
    substitutions = [
        ("/data/nnUNet_raw", str(tmp_path / "raw")),
        ("/data/nnUNet_preprocessed", str(tmp_path / "pre")),
        ("/data/nnUNet_results", str(tmp_path / "results")),
        ("FreedomIntelligence/HuatuoGPT-Vision-7B-Qwen2.5VL", str(vlm)),
        ("embed $DATA", f"embed --clip-model {clip} $DATA"),
        ("--nproc_per_node 8", "--nproc_per_node 1"),
        ("--nproc_per_node 4", "--nproc_per_node 1"),
        ("train.steps=20000", "train.steps=2"),
    ]
    script = _block()
    for old, new in substitutions:
        assert old in script, f"the README example no longer contains {old!r}: update this test's substitutions"
        script = script.replace(old, new)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with it
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    # every step left its output, and the cache describes the preprocessed dataset with raw-HU renders
    assert sorted(p.name for p in (tmp_path / "slices_png").iterdir())
    assert (tmp_path / "captions.jsonl").stat().st_size > 0
    cache = TeacherCache(tmp_path / "cache")
    assert cache.has_text and len(cache.cases) == 3
    source = read_manifest(tmp_path / "cache")["settings"]["source"]
    assert (source["kind"], source["scanner_units"]) == ("nnunet_preprocessed", "raw")
    assert (tmp_path / "runs" / "abdomen" / "checkpoints").is_dir()
    assert list((tmp_path / "runs" / "abdomen").glob("*.safetensors"))
