"""Captioning a dataset in one process or sharded over real ``torchrun`` processes (gloo, CPU), with a tiny random
LLaVA saved to a folder and loaded through ``load_vlm``: the merged caption file is the same bytes for any number of
processes, a resumed run (with any number of processes) skips captioned slices before rendering them, and bad input
is one line.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import interrupted_captioner_class
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.slices import RenderSettings, SlicePolicy, dataset_slices
from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
from med3dinsight_plugin.teacher.captioner import (
    Captioner,
    CaptionError,
    CaptionFile,
    SliceRenderer,
    VLMError,
    caption_dataset,
    caption_key,
    caption_slices,
    load_vlm,
)
from med3dinsight_plugin.teacher.captions import merge_shards, shard_files, shard_folder, shard_path
from med3dinsight_plugin.teacher.embed import caption_settings_for
from med3dinsight_plugin.teacher.tiny import save_tiny_llava
from med3dinsight_plugin.volumes import open_source

BIN = Path(sys.executable).parent / "med3dinsight"
POLICY = SlicePolicy(per_plane=2)  # 6 slices per case
RENDER = RenderSettings(size=32)
BATCH, TOKENS = 8, 4  # units of ceil(8 / 6) = 2 cases: 5 cases -> units [0, 1], [2, 3], [4]
CLI_ARGS = ["--per-plane", "2", "--size", "32", "--batch-size", str(BATCH), "--max-new-tokens", str(TOKENS),
            "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_shards")
    data = write_nnunet_raw_dataset(root / "raw", cases=5, shape=(24, 28, 32))
    folder = save_tiny_llava(root / "llava")
    vlm = load_vlm(str(folder))
    return {"root": root, "data": data, "folder": folder, "source": open_source(data), "vlm": vlm}


def _captioner(world, cls=Captioner):
    return cls(world["vlm"], batch_size=BATCH, max_new_tokens=TOKENS)


def _caption(world, out, captioner=None, renderer=None):
    """caption_dataset in this process, with the settings the command line records."""
    return caption_dataset(world["source"], captioner or _captioner(world), out, POLICY, RENDER,
                           settings={"model": str(world["folder"]), "max_new_tokens": TOKENS}, progress=False,
                           renderer=renderer)


@pytest.fixture(scope="module")
def reference(world):
    """The caption file and sidecar of one process."""
    out = world["root"] / "ref" / "captions.jsonl"
    result = _caption(world, out)
    assert result.written == result.captions == 30 and result.skipped == 0 and result.world == 1
    assert not shard_folder(out).exists()  # merged and removed
    return out.read_bytes(), Path(f"{out}.meta.json").read_bytes()


def _torchrun(world, out, nproc=2, port=29571, vlm=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(port), str(BIN), "caption", str(world["data"]), "--vlm",
                           str(vlm or world["folder"]), "-o", str(out), *CLI_ARGS], capture_output=True, text=True,
                          env=env)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


_Interrupted = interrupted_captioner_class()  # Ctrl-C during the 3rd batch


class _CountingRenderer(SliceRenderer):
    """Counts the slices it renders (and where)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rendered = []

    def render_one(self, data, spacing, window, s):
        self.rendered.append(s.key)
        return super().render_one(data, spacing, window, s)


# ------------------------------------------------------------------------------------------- 1 vs 2 processes

@pytest.mark.slow
def test_one_process_writes_what_caption_slices_wrote(world, reference, tmp_path):
    """The merged file of one process is the file the single-process captioner always wrote (same order, same
    sidecar), so caption files from before sharding resume."""
    old = tmp_path / "old.jsonl"
    settings = {"model": str(world["folder"]), "max_new_tokens": TOKENS, "image_size": RENDER.size,
                **caption_settings_for(POLICY, RENDER)}
    caption_slices(dataset_slices(world["source"], POLICY, RENDER), _captioner(world), old, settings, progress=False)
    assert old.read_bytes() == reference[0]
    assert Path(f"{old}.meta.json").read_bytes() == reference[1]


@pytest.mark.slow
def test_two_torchrun_processes_write_the_same_bytes_as_one(world, reference, tmp_path):
    out = tmp_path / "two" / "captions.jsonl"
    stdout = _torchrun(world, out)
    assert re.search(r"30 captions written, 0 already there \(30 in the file; 2 process\(es\)", stdout), stdout
    assert out.read_bytes() == reference[0]
    assert Path(f"{out}.meta.json").read_bytes() == reference[1]
    assert not shard_folder(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["captions.jsonl", "captions.jsonl.meta.json"]


@pytest.mark.slow
def test_a_run_interrupted_in_one_process_resumes_in_two(world, reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _caption(world, out, _captioner(world, _Interrupted))
    assert not out.exists()  # nothing merged yet: the captions so far are in this process's shard
    assert [p.name for p in shard_files(out)] == ["rank-00000-of-00001.jsonl"]
    assert len(CaptionFile.read(shard_path(out, 0, 1))) == 12  # the batches of 8 and 4 of unit [case000, case001]
    stdout = _torchrun(world, out, port=29572)
    assert "18 captions written, 12 already there (30 in the file; 2 process(es)" in stdout, stdout
    assert out.read_bytes() == reference[0]
    assert not shard_folder(out).exists()


# ------------------------------------------------------------------------------------------------------ resume

def test_resume_skips_captioned_slices_before_rendering_them(world, reference, tmp_path):
    lines = reference[0].decode().splitlines(keepends=True)
    out = tmp_path / "captions.jsonl"
    meta = Path(f"{out}.meta.json")
    meta.write_bytes(reference[1])
    out.write_text("".join(lines[:9]))  # case000 and half of case001 merged earlier
    shard = shard_path(out, 1, 2)  # a shard of an interrupted 2-process run: case002
    shard.parent.mkdir()
    shard.write_text("".join(lines[12:18]))
    renderer = _CountingRenderer(POLICY, RENDER)
    result = _caption(world, out, renderer=renderer)
    expected = [caption_key(r["case"], r["plane"], r["position"]) for r in map(json.loads, lines[9:12] + lines[18:])]
    assert renderer.rendered == expected  # only the slices not captioned yet, each once
    assert len(renderer.rendered) == result.written == 30 - 9 - 6 and result.skipped == 15
    assert out.read_bytes() == reference[0] and not shard_folder(out).exists()
    again = _CountingRenderer(POLICY, RENDER)
    result = _caption(world, out, renderer=again)
    assert again.rendered == [] and result.written == 0 and result.skipped == 30
    assert out.read_bytes() == reference[0]


def test_the_renderer_renders_what_volume_slices_renders(world):
    from med3dinsight_plugin.slices import volume_slices

    volume = world["source"].read(world["source"].cases[0])
    renderer = SliceRenderer(POLICY, RENDER)
    chosen = renderer.select(volume)
    assert all(s.image is None for s in chosen)
    renderer.render(volume, chosen)
    expected = list(volume_slices(volume, POLICY, RENDER))
    assert [s.key for s in chosen] == [s.key for s in expected]
    assert all((a.image == b.image).all() for a, b in zip(chosen, expected))


def test_a_crash_between_merge_and_shard_removal_merges_to_the_same_bytes(reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_bytes(reference[0])
    lines = reference[0].decode().splitlines(keepends=True)
    shard = shard_path(out, 0, 2)
    shard.parent.mkdir()
    shard.write_text("".join(reversed(lines[3:20])))  # the same records again, in another order
    assert merge_shards(out) == {"records": 30, "shards": 1}
    assert out.read_bytes() == reference[0] and not shard.parent.exists()


def _shards(out, reference, *parts):
    """The sidecar of the reference run and shard files of ``out`` holding the given lists of reference lines."""
    lines = reference[0].decode().splitlines(keepends=True)
    Path(f"{out}.meta.json").write_bytes(reference[1])
    shard_folder(out).mkdir()
    for rank, part in enumerate(parts):
        shard_path(out, rank, len(parts)).write_text("".join(part(lines) if callable(part) else part))
    return lines


def test_identical_duplicates_in_two_shards_merge_silently(reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    _shards(out, reference, lambda lines: lines[:20], lambda lines: lines[10:])  # lines 10-19 in both
    assert merge_shards(out) == {"records": 30, "shards": 2}
    assert out.read_bytes() == reference[0]


@pytest.mark.slow
def test_shards_that_disagree_or_hold_a_foreign_case_are_refused_before_captioning(world, reference, tmp_path,
                                                                                    capsys):
    args = ["caption", world["data"], "--vlm", world["folder"], *CLI_ARGS]
    out = tmp_path / "conflict.jsonl"
    lines = _shards(out, reference, lambda lines: lines[:12], lambda lines: lines[6:12])
    changed = json.loads(lines[8])
    changed["text"] = "another caption"
    shard_path(out, 1, 2).write_text("".join(lines[6:8]) + json.dumps(changed) + "\n" + "".join(lines[9:12]))
    key = caption_key(changed["case"], changed["plane"], changed["position"])
    before = {p: p.read_bytes() for p in shard_files(out)}
    code, err = _run(capsys, *args, "-o", out)
    _one_line(code, err, f"the shard {shard_path(out, 1, 2)} holds another caption for {key!r} than "
                         f"{shard_path(out, 0, 2)}", "delete that shard file")
    assert not out.exists() and {p: p.read_bytes() for p in shard_files(out)} == before  # nothing captioned, merged
    with pytest.raises(CaptionError, match="holds another caption"):
        merge_shards(out)
    out.write_bytes(reference[0])  # against the caption file itself
    shutil.rmtree(shard_folder(out))
    _shards(out, reference, [json.dumps(changed) + "\n"])
    _one_line(*_run(capsys, *args, "-o", out), f"the shard {shard_path(out, 0, 1)} holds another caption for "
                                               f"{key!r} than {out}")
    assert out.read_bytes() == reference[0]

    foreign = tmp_path / "foreign.jsonl"
    other = json.loads(lines[0])
    other["case"] = "case999"
    _shards(foreign, reference, lambda lines: lines[:3] + [json.dumps(other) + "\n"])
    _one_line(*_run(capsys, *args, "-o", foreign), f"the shard {shard_path(foreign, 0, 1)} holds captions of case "
                                                   f"'case999', which is not in the dataset", "delete that shard")
    assert not foreign.exists()
    with pytest.raises(CaptionError, match="not in the dataset"):
        merge_shards(foreign, cases=world["source"].cases)


# ------------------------------------------------------------------------------------------------ one run per file

HOLD_CAPTION_LOCK = """
import sys
from med3dinsight_plugin.teacher.captions import caption_lock
lock = caption_lock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
"""


@pytest.mark.slow
def test_a_second_run_on_the_same_file_fails_on_every_rank_before_the_model_loads(world, tmp_path):
    from med3dinsight_plugin.runlock import RunLockedError

    out = tmp_path / "captions.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CAPTION_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = f"the caption file {out} is in use by process {holder.pid} on "
        with pytest.raises(RunLockedError, match=re.escape(busy)):
            _caption(world, out)
        # a model folder that does not exist: the lock is what the command reports, on both ranks
        proc = _torchrun(world, out, port=29573, vlm=tmp_path / "no_model", check=False)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("med3dinsight caption: error: ")]
        assert len(errors) == 2 and all(busy in e and f"({out}.lock)" in e for e in errors), proc.stderr[-3000:]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl.lock"]  # nothing else written
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and not Path(f"{out}.lock").exists()


# ------------------------------------------------------------------------------------------------- bad input

def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if not re.match(r"^[\w .()]+:\s*\d+%\|", line)]
    return code, err


def _one_line(code, err, *needles):
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.slow
def test_bad_input_is_one_line(world, reference, tmp_path, capsys):
    args = ["caption", world["data"], "--vlm", world["folder"], *CLI_ARGS]
    folder = tmp_path / "a_folder"
    folder.mkdir()
    _one_line(*_run(capsys, *args, "-o", folder), f"{folder} is a folder", "-o/--output")
    # checked before the model loads: a missing model folder is not what is reported
    _one_line(*_run(capsys, "caption", world["data"], "--vlm", tmp_path / "none", "-o", tmp_path / "c.jsonl",
                    "--batch-size", "0"), "--batch-size", "at least 1")
    blocked = tmp_path / "blocked.jsonl"
    shard_folder(blocked).write_text("not a folder")
    _one_line(*_run(capsys, *args, "-o", blocked), f"{shard_folder(blocked)} is a file")

    out = tmp_path / "broken.jsonl"
    Path(f"{out}.meta.json").write_bytes(reference[1])
    shard = shard_path(out, 1, 2)
    shard.parent.mkdir()
    shard.write_text(reference[0].decode().splitlines(keepends=True)[0] + "{not json\n")
    _one_line(*_run(capsys, *args, "-o", out), "rank-00001-of-00002.jsonl line 2: malformed caption record")
    assert not out.exists()

    other = tmp_path / "other.jsonl"
    Path(f"{other}.meta.json").write_bytes(reference[1])
    shard = shard_path(other, 0, 1)
    shard.parent.mkdir()
    shard.write_bytes(reference[0])
    with pytest.raises(CaptionError, match=r"other\.jsonl was written with other settings.*generation"):
        caption_dataset(world["source"], Captioner(world["vlm"], max_new_tokens=TOKENS + 1), other, POLICY, RENDER,
                        settings={"model": str(world["folder"])}, progress=False)
    with pytest.raises(VLMError, match="renderer's slice policy"):
        _caption(world, other, renderer=SliceRenderer(SlicePolicy(per_plane=3), RENDER))
