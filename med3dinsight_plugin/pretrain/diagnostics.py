"""Diagnostics of a pretraining run: held-out slice retrieval accuracy, modality gaps, the metrics log and its plot.

Retrieval asks whether PSAT's prediction for a held-out slice is closer to that slice's teacher embedding than to
the other N - 1 slices' embeddings: chance is 1/N (top-1) and 5/N (top-5). The modality gap (Liang et al., 2022,
"Mind the Gap") is the distance between the centroids of two sets of L2-normalised embeddings.
"""
from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from ..fileio import atomic_write, unwrap
from ..model import SliceOutputs

__all__ = ["MetricsLog", "caption_warning", "evaluate", "metrics_figure", "plot_metrics", "retrieval_metrics"]


def retrieval_metrics(z3d: torch.Tensor, image_emb: torch.Tensor, text_emb: Optional[torch.Tensor] = None,
                      z_text: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Retrieval accuracy and modality gaps for N held-out slices.

    Args:
        z3d: (N, E) PSAT predictions.
        image_emb: (N, E) the slices' image-teacher embeddings, row i paired with prediction i.
        text_emb: (N, E) the slices' text embeddings, or ``None``.
        z_text: (N, E_text) PSAT's text-head predictions when the text space is separate (``text_emb`` then has
            their width); ``None``: ``z3d`` predicts both.

    Returns:
        ``image_top1``, ``image_top5`` (and ``text_top1``, ``text_top5``): fraction of predictions whose own slice's
        embedding ranks first / in the first five among all N (identical targets, e.g. repeated captions, count as
        the own one); ``chance_top1`` = 1/N, ``chance_top5`` = min(5, N)/N for distinct targets, and
        ``image_chance_top1`` ... the chance levels given the repeated targets; ``image_distinct`` (and
        ``text_distinct``): the fraction of distinct targets (1.0: all differ; 1/N: all identical);
        ``gap_z3d_image`` (and ``gap_z3d_text``, ``modality_gap`` = image vs text): centroid distances. All inputs
        are L2-normalised here. With a separate text space there is no ``modality_gap`` (the spaces differ).
    """
    zt = z3d if z_text is None else z_text
    if z3d.dim() != 2 or image_emb.shape != z3d.shape or (text_emb is not None and text_emb.shape != zt.shape):
        raise ValueError(f"retrieval_metrics expects (N, E) tensors of equal shape, got {tuple(z3d.shape)}, "
                         f"{tuple(image_emb.shape)}" + (f", {tuple(text_emb.shape)}" if text_emb is not None else ""))
    n = z3d.shape[0]
    preds = {"image": F.normalize(z3d.detach().float(), dim=-1), "text": F.normalize(zt.detach().float(), dim=-1)}
    targets = {"image": image_emb, "text": text_emb}
    out: Dict[str, float] = {"chance_top1": 1.0 / n, "chance_top5": min(5, n) / n}
    normed = {}
    for name, emb in targets.items():
        if emb is None:
            continue
        t = normed[name] = F.normalize(emb.detach().float(), dim=-1)
        z = preds[name]
        sims = z @ t.T
        own = sims.diagonal()[:, None]
        # Identical targets (two slices with the same caption) are the same answer: only a *different* target
        # scoring higher counts against the prediction, and the chance level rises accordingly.
        same = (t @ t.T) > 1 - 1e-6
        rank = ((sims > own) & ~same).sum(1)
        out[f"{name}_top1"] = float((rank < 1).float().mean())
        out[f"{name}_top5"] = float((rank < 5).float().mean())
        copies = same.sum(1).tolist()
        out[f"{name}_distinct"] = sum(1 / c for c in copies) / n  # the number of distinct targets, over N
        out[f"{name}_chance_top1"] = sum(c / n for c in copies) / n
        out[f"{name}_chance_top5"] = sum(1 - math.comb(n - c, min(5, n)) / math.comb(n, min(5, n))
                                         for c in copies) / n
        out[f"gap_z3d_{name}"] = _gap(z, t)
    if "text" in normed and z_text is None:
        out["modality_gap"] = _gap(normed["image"], normed["text"])
    return out


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.mean(0) - b.mean(0)).norm())


@torch.no_grad()
def evaluate(model, eval_set, batch_size: int, device, amp_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Retrieval metrics and reconstruction error of ``model`` on every slice of ``eval_set``.

    Args:
        model: a :class:`Med3DInsightModel` (DDP / compile wrappers are looked through).
        eval_set: finite map-style dataset (``len``) of the training items.
        batch_size: volumes per forward pass.
        device: where to run.
        amp_dtype: autocast dtype, or ``None`` for full precision.

    Returns:
        :func:`retrieval_metrics` over all N slices (cases x K, less those a ``mask`` marks as padding), plus
        ``reconstruction`` (mean MSE). The model's train/eval mode is restored.
    """
    from torch.utils.data import default_collate

    model = unwrap(model)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    z_all, zt_all, image_all, text_all = [], [], [], []
    mse, volumes = 0.0, 0
    try:
        for first in range(0, len(eval_set), batch_size):
            batch = default_collate([eval_set[i] for i in range(first, min(first + batch_size, len(eval_set)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                z3d, reconstruction = model.encode(batch["volume"], batch["plane"], batch["position"])
            keep = batch["mask"].reshape(-1).bool().cpu() if "mask" in batch else slice(None)  # padding slices out
            flat = lambda t: t.float().reshape(-1, t.shape[-1]).cpu()[keep]  # noqa: E731
            if isinstance(z3d, SliceOutputs):
                if z3d.text is not None:
                    zt_all.append(flat(z3d.text))
                z3d = z3d.image
            z_all.append(flat(z3d))
            image_all.append(flat(batch["image_emb"]))
            if "text_emb" in batch:
                text_all.append(flat(batch["text_emb"]))
            b = batch["volume"].shape[0]
            reconstruction = getattr(reconstruction, "output", reconstruction)  # eval mode never masks; to be sure
            mse += float(F.mse_loss(reconstruction.float(), batch["volume"].float())) * b
            volumes += b
    finally:
        model.train(was_training)
    if not z_all:
        raise ValueError("the evaluation set is empty")
    text = torch.cat(text_all) if len(text_all) == len(z_all) else None
    z_text = torch.cat(zt_all) if zt_all else None
    return {**retrieval_metrics(torch.cat(z_all), torch.cat(image_all), text, z_text),
            "reconstruction": mse / volumes}


_LOSS_KEYS = ("loss", "image", "text", "reconstruction")
_EVAL_KEYS = ("image_top1", "image_top5", "text_top1", "text_top5")


MARKER_POINTS = 50  # curves of at most this many points get a marker on each (a short run logs a few, or one)


def plot_metrics(metrics_jsonl: str | Path, png_path: str | Path) -> Path:
    """Plot training losses and held-out retrieval accuracy against the step (PNG via Agg, written atomically).

    Args:
        metrics_jsonl: a run's ``metrics.jsonl``.
        png_path: the image to write.

    Returns:
        The path written.
    """

    records = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed run
    fig = metrics_figure(records)
    path = Path(png_path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def metrics_figure(records):
    """The figure :func:`plot_metrics` writes, from the records of ``metrics.jsonl``: training losses, the learning
    rate (log scale: a run still in its warm-up shows why its losses barely move) and held-out retrieval against the
    step. A curve of few points (a short run logs one or a few) shows a marker on each, so that a single point is
    seen; a panel without data says why."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no GUI backend touched
    from matplotlib.ticker import MaxNLocator

    def curve(ax, points, **style):
        if len(points) <= MARKER_POINTS:
            style.setdefault("marker", "o")
            style.setdefault("markersize", 4 if len(points) > 10 else 6)
        return ax.plot(*zip(*points), **style)

    def empty(ax, text):
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize="medium", color="grey",
                wrap=True)

    fig = Figure(figsize=(15, 4), layout="constrained")
    ax_loss, ax_lr, ax_ret = fig.subplots(1, 3, width_ratios=(4, 3, 4))
    for key in _LOSS_KEYS:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            curve(ax_loss, points, label=key)
    if not ax_loss.get_legend_handles_labels()[0]:
        empty(ax_loss, "no training loss logged yet")
    lr = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float)) and r["lr"] > 0]
    if lr:  # a run still in its warm-up shows here why its losses barely move
        curve(ax_lr, lr, color="grey", label=f"last {lr[-1][1]:.2g}")
        ax_lr.set_yscale("log")
        ax_lr.legend(fontsize="small")
    else:
        empty(ax_lr, "no learning rate logged yet")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate (warm-up, decay)")
    ax_loss.set(xlabel="step", ylabel="training loss", title="losses")
    for key in _EVAL_KEYS:
        points = [(r["step"], r[f"eval/{key}"]) for r in records if r.get(f"eval/{key}") is not None]
        if points:
            ax_ret.plot(*zip(*points), marker="o", label=key)
    # image chance assumes distinct slices; text chance counts repeated captions as the own one (all identical
    # captions: 1.0 -- text retrieval then says nothing, and the line shows it)
    for key, color in (("chance_top1", "grey"), ("chance_top5", "grey"), ("text_chance_top1", "tab:brown"),
                       ("text_chance_top5", "tab:brown")):
        chance = [r[f"eval/{key}"] for r in records if r.get(f"eval/{key}") is not None]
        if chance:
            ax_ret.axhline(chance[-1], color=color, linestyle=":" if key.endswith("top1") else "--", label=key)
    if not ax_ret.get_legend_handles_labels()[0]:
        empty(ax_ret, "no held-out evaluation in this run\n(data.eval_cases: 0, or no evaluation step yet)")
    ax_ret.set(xlabel="step", ylabel="held-out retrieval accuracy", title="3D -> 2D slice retrieval", ylim=(0, 1.02))
    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    for ax in (ax_loss, ax_lr, ax_ret):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 3.8, 4.0, 4.2 around a single point
        if steps and max(steps) - min(steps) < 2:
            ax.set_xlim(min(steps) - 1, max(steps) + 1)
    for ax in (ax_loss, ax_ret):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


DISTINCT_CAPTIONS_WARNING = 0.1  # below this fraction of distinct held-out captions, text retrieval says little


def caption_warning(record: Dict[str, Any]) -> Optional[str]:
    """A warning line when an evaluation record's held-out captions are (nearly) all identical, else ``None``."""
    distinct = record.get("eval/text_distinct")
    if distinct is None or distinct >= DISTINCT_CAPTIONS_WARNING:
        return None
    chance = record.get("eval/text_chance_top1")
    return (f"warning: only {distinct:.0%} of the held-out captions are distinct, so text retrieval is near "
            f"{'certain' if chance is None else f'{chance:.2f}'} by chance (text_top1/top5 say little; see the "
            f"text chance lines of the plot); caption the slices with more specific prompts for a useful text "
            f"target")


class MetricsLog:
    """A run's metric outputs (rank 0): ``metrics.jsonl`` (appended and flushed line by line), TensorBoard scalars
    under ``tensorboard/`` when TensorBoard is installed, and a tqdm progress bar with rate and ETA.

    Args:
        out: the run folder.
        total: the run's last step (for the bar).
        start: the step the run starts from; lines of later steps (from a killed run) are dropped, and a fresh run
            (``start=0``) starts a new file.
        progress: show the bar.
    """

    def __init__(self, out: Path, total: int, start: int, progress: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        _rewind(self.path, start)
        self.file = open(self.path, "a")
        self.writer = None
        self.warned = False
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start or None)
        except ImportError:
            print("note: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="pretraining")
            except ImportError:
                pass

    def write(self, record: Dict[str, Any]) -> None:
        """Append one record (it must hold ``step``); non-finite numbers become null (strict JSON). An evaluation
        whose held-out captions are (nearly) all identical is warned about once (:func:`caption_warning`)."""
        record = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
        warning = None if self.warned else caption_warning(record)
        if warning:
            self.warned = True
            self.note(warning)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
            self.writer.flush()

    def note(self, line: str) -> None:
        """Print a line to stderr without breaking the progress bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def advance(self, step: int, record: Dict[str, Any]) -> None:
        """Write ``record`` if not empty and move the bar to ``step``."""
        if record:
            self.write(record)
            if self.bar is not None and record.get("loss") is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _rewind(path: Path, start: int) -> None:
    """Keep the lines of steps <= ``start`` (a resumed run rewrites the later ones); ``start=0``: a new file."""

    if not path.is_file():
        return
    if start == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
