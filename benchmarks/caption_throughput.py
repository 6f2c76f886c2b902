"""Captioning throughput of ``med3dinsight caption`` in 1 and in 2 ``torchrun`` processes, side by side.

Run: python benchmarks/caption_throughput.py [--cases 16] [--shape 48 64 64] [--per-plane 6] [--batch-size 8]
                                              [--max-new-tokens 24] [--size 64] [--device cpu] [--threads 1]

A tiny random LLaVA (``teacher.tiny.save_tiny_llava``; nothing is downloaded) captions the slices of a synthetic
dataset, once per process count, each time into a new file, through the real command line under
``python -m torch.distributed.run --nproc_per_node N`` (gloo on CPU, NCCL on GPUs; ``--threads`` intra-op threads per
process, so that N processes use N cores as N GPUs would). Printed per process count: captions written, the
captioning time (from the first slice to the merged file, as the command reports it), captions/s, the wall time of
the whole command (start-up and model loading included) and the speed-up over one process; then whether the two
merged caption files are byte-identical (they must be).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPORT = re.compile(r"(\d+) captions written, (\d+) already there \((\d+) in the file; (\d+) process\(es\), "
                    r"([\d.]+) s, ([\d.]+) captions/s\)")


def run(nproc: int, data: Path, vlm: Path, out: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29650 + nproc), str(Path(sys.executable).parent / "med3dinsight"), "caption", str(data), "--vlm",
           str(vlm), "-o", str(out), "--per-plane", str(args.per_plane), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--size", str(args.size), "--device", args.device]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    m = REPORT.search(proc.stdout)
    if not m:
        sys.exit(f"no summary line in the output of {nproc} process(es):\n{proc.stdout}")
    return {"written": int(m.group(1)), "seconds": float(m.group(5)), "rate": float(m.group(6)), "wall": wall,
            "bytes": out.read_bytes()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", nargs=3, type=int, default=[48, 64, 64])
    parser.add_argument("--per-plane", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--size", type=int, default=64, help="rendered slice size")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (one GPU per process, NCCL)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    args = parser.parse_args()

    from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
    from med3dinsight_plugin.teacher.tiny import save_tiny_llava

    tmp = Path(tempfile.mkdtemp(prefix="caption_throughput_"))
    data = write_nnunet_raw_dataset(tmp / "raw", cases=args.cases, shape=tuple(args.shape))
    vlm = save_tiny_llava(tmp / "tiny-llava")
    results = {n: run(n, data, vlm, tmp / f"captions_{n}.jsonl", args) for n in (1, 2)}

    print(f"tiny random LLaVA, {args.cases} synthetic CT volumes {tuple(args.shape)}, {args.per_plane} slices per "
          f"plane, batch {args.batch_size}, {args.max_new_tokens} new tokens, {args.size}px, device {args.device}, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPU core(s) on this machine (load average "
          f"{os.getloadavg()[0]:.1f} after the runs)")
    print(f"{'processes':>9}  {'captions':>8}  {'captioning s':>12}  {'captions/s':>10}  {'wall s':>7}  "
          f"{'speed-up':>8}")
    base = results[1]["rate"]
    for n, r in results.items():
        print(f"{n:>9}  {r['written']:>8}  {r['seconds']:>12.2f}  {r['rate']:>10.2f}  {r['wall']:>7.1f}  "
              f"{r['rate'] / base:>7.2f}x")
    same = results[1]["bytes"] == results[2]["bytes"]
    print(f"merged caption files byte-identical for 1 and 2 processes: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
