"""One embed run per cache folder: the run lock that caption and pretrain take (med3dinsight_plugin.runlock)."""
import os
import subprocess
import sys
import time

from helpers import ct_world, one_line_failure
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.runlock import RunLock


def test_a_second_embed_on_the_same_cache_fails_at_once_naming_the_holder(tmp_path, capsys):
    (tmp_path / "world").mkdir()
    world = ct_world(tmp_path / "world")
    cache = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from med3dinsight_plugin.runlock import RunLock; "
        f"RunLock({str(cache)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()  # the fixture embed's progress bar
        code = main(["embed", str(world / "vols"), "-o", str(cache), "--clip-model", str(world / "clip"),
                     "--per-plane", "2", "--modality", "ct"])
        err = capsys.readouterr().err.strip().splitlines()
        line = one_line_failure(code, err, str(cache), str(holder.pid))
        assert "teacher cache" in line
        assert not list(cache.glob("shard-*"))  # nothing written while another run holds the folder
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    RunLock(cache).acquire().release()  # free again once the holder is gone
