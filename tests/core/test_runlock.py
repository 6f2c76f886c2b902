"""The one-run-per-output lock shared by ``caption`` and ``pretrain`` (``med3dinsight_plugin.runlock``): a second
caption process on the same output fails at once naming the lock and the holder's pid (real processes), the lock is
re-entrant within a process, a lock left by a dead process is taken over, and folders created only for the lock go
again. The pretraining side is tested in test_robust_pretrain.py (17. one run per folder)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import run_tool, write_nifti
from med3dinsight_plugin.runlock import RunLock, RunLockedError
from med3dinsight_plugin.teacher.captions import CaptionFile, caption_lock

# A real caption run (caption --from-labels' own function) that stops before reading its first volume, holding the
# caption file's lock, until a line arrives on stdin; then it finishes.
PAUSED_CAPTION = """
import sys
from med3dinsight_plugin.teacher.label_captions import caption_from_labels
from med3dinsight_plugin.slices import SlicePolicy
from med3dinsight_plugin.volumes import open_source


class Paused:
    def __init__(self, source):
        self.source, self.waited = source, False

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read(self, case):
        if not self.waited:
            print("captioning", flush=True)
            sys.stdin.readline()
            self.waited = True
        return self.source.read(case)


result = caption_from_labels(Paused(open_source(sys.argv[1], modality="ct")), sys.argv[2], sys.argv[3],
                             SlicePolicy(per_plane=2), progress=False)
print(f"written {result.written}", flush=True)
"""


def _dataset(root: Path):
    """Two CT cases with label masks: root/img, root/lab."""
    image = np.full((24, 24, 24), -1000, np.int16)
    image[4:20, 4:20, 4:20] = 40
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[6:18, 6:18, 6:18] = 1
    (root / "img").mkdir()
    (root / "lab").mkdir()
    for case in ("a", "b"):
        write_nifti(root / "img" / f"{case}.nii.gz", image)
        write_nifti(root / "lab" / f"{case}.nii.gz", labels)
    return root / "img", root / "lab"


@pytest.mark.slow
def test_a_second_caption_process_fails_naming_the_lock_and_the_holder(tmp_path):
    img, lab = _dataset(tmp_path)
    out = tmp_path / "new" / "captions.jsonl"
    lock = Path(f"{out}.lock")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", PAUSED_CAPTION, str(img), str(lab), str(out)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "captioning"
        assert lock.read_text().split() == [str(first.pid), socket.gethostname()]
        second = run_tool(["med3dinsight", "caption", img, "--from-labels", lab, "-o", out, "--modality", "ct",
                           "--per-plane", "2"], env, check=False)
        assert second.returncode == 2 and second.stdout == "", second
        assert second.stderr.strip().splitlines() == [
            f"med3dinsight caption: error: the caption file {out} is in use by process {first.pid} on "
            f"{socket.gethostname()} ({lock}); wait for that run to end or stop it, or choose another -o/--output"]
        assert lock.read_text().split()[0] == str(first.pid)  # still the first's
        assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["captions.jsonl.lock"]
    finally:
        stdout, _ = first.communicate("\n", timeout=120)
    assert first.returncode == 0 and stdout.strip() == "written 12"
    assert sorted(p.name for p in out.parent.iterdir()) == ["captions.jsonl", "captions.jsonl.meta.json"]
    again = run_tool(["med3dinsight", "caption", img, "--from-labels", lab, "-o", out, "--modality", "ct",
                      "--per-plane", "2"], env)
    assert again.stdout.strip() == f"{out}: 0 captions written, 12 already there"
    assert len(CaptionFile.read(out)) == 12 and not lock.exists()


def test_a_failed_caption_run_leaves_neither_lock_nor_the_folders_made_for_it(tmp_path, capsys):
    from med3dinsight_plugin.cli import main

    img, lab = _dataset(tmp_path)
    (lab / "a.nii.gz").write_bytes(b"not a label file")  # found only once the run holds the lock
    out = tmp_path / "deep" / "er" / "captions.jsonl"
    assert main(["caption", str(img), "--from-labels", str(lab), "-o", str(out), "--modality", "ct"]) == 2
    assert "a.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()


@pytest.mark.slow
def test_the_lock_nests_within_a_process_and_only_the_outermost_release_frees_it(tmp_path):
    out = tmp_path / "sub" / "c.jsonl"
    outer = caption_lock(out).acquire()
    inner = caption_lock(out).acquire()
    assert outer.held and inner.held and outer.path == tmp_path / "sub" / "c.jsonl.lock"
    inner.release()
    assert outer.path.read_text().split()[0] == str(os.getpid())  # still held
    probe = subprocess.run([sys.executable, "-c", "import sys; from med3dinsight_plugin.teacher.captions import "
                            "caption_lock; caption_lock(sys.argv[1]).acquire()", str(out)], capture_output=True,
                           text=True)
    assert probe.returncode != 0 and f"in use by process {os.getpid()}" in probe.stderr
    outer.release()
    assert not outer.path.exists() and not (tmp_path / "sub").exists()  # made for the lock, empty: removed
    with caption_lock(out):  # free again
        out.write_text("")
    assert out.exists() and not outer.path.exists()  # the folder holds the output now: kept


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "c.jsonl"
    Path(f"{out}.lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    with caption_lock(out) as lock:
        assert lock.path.read_text().split()[0] == str(os.getpid())
    assert f"taking over the stale lock {out}.lock left by process {dead.stdout.strip()}" in capsys.readouterr().err
    assert not lock.path.exists()


def test_pretrain_keeps_its_lock_and_its_names():
    from med3dinsight_plugin.errors import Med3DInsightError
    from med3dinsight_plugin.pretrain import run
    from med3dinsight_plugin.runlock import RunLockError

    assert run.RunLock is RunLock and run.RunLockedError is RunLockedError
    assert issubclass(RunLockedError, RunLockError) and issubclass(RunLockError, Med3DInsightError)
    lock = RunLock("/some/run")
    assert lock.path == Path("/some/run/.lock") and lock.what == "the run folder /some/run" and not lock.tidy


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    from med3dinsight_plugin.runlock import RunLockError

    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockError, match=r"cannot write to the output folder .*file/run .*choose another "
                                           r"-o/--output"):
        caption_lock(tmp_path / "file" / "run" / "c.jsonl").acquire()
