"""Test helpers: tiny real configurations of every registered backbone, the toy pretraining data, tools."""
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from med3dinsight_plugin.backbones import list_families

# Tiny but real configurations of every backbone, for tests that run forward and backward passes: each family's
# descriptor brings its own (BackboneFamily.tiny), so every test parametrised over these checks a new family too.
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests/ live in folders below it
TINY_BACKBONES = {name: dict(kwargs) for family in list_families() for name, kwargs in family.tiny.items()}

EMBED = 16  # teacher embedding width of the toy pretraining data

# `med3dinsight pretrain --set` overrides for a tiny real model on 16^3 crops: a step takes well under a second on a
# CPU (tests that pretrain on real files through the CLI)
# The paper's recipe (global image + text alignment, no dense distillation): what most tests exercise, on caches
# without feature maps; the default recipe (dense distillation) has tests of its own.
PAPER_RECIPE = ["model.loss_weights.image=1", "model.loss_weights.text=1", "model.loss_balance.dense=null"]
FAST_PRETRAIN = [*PAPER_RECIPE,
                 "model.backbone=plain_conv_unet", "model.backbone_kwargs={base_features: 4, max_features: 16}",
                 "model.patch_size=[16,16,16]", "model.psat=small",
                 "model.psat_kwargs={width: 32, depth: 1, heads: 4, num_queries: 6, num_slice_bins: 16}",
                 "train.steps=2", "train.batch_size=1", "data.num_workers=0", "data.eval_cases=0"]


class ToyDataset:
    """Deterministic toy pretraining data: item i is a function of (seed, i) only.

    The volume is a smooth random field; each of its K slices (random plane and position) gets teacher embeddings
    that a 3D model can learn: a fixed random linear map of the slice's 2x2-region mean intensities and of its plane
    and position, L2-normalised (a second fixed map gives the "text" embeddings). Every third item marks its last
    slice as padding (``mask``), as the real dataset does for crops holding fewer than K cached slices.
    """

    def __init__(self, seed=0, length=None, size=32, k=4, delay=0.0, maps=None):
        self.seed, self.length, self.size, self.k, self.delay = seed, length, size, k, delay
        g = torch.Generator().manual_seed(1234)  # the "teacher": the same for every split
        self.image_map, self.text_map = torch.randn(2, EMBED, 4 + 3 + 2, generator=g).unbind(0)
        # maps=(C, S): dense targets, a fixed random projection of the slice's S x S mean intensities (+ a bias)
        self.maps = maps
        if maps is not None:
            self.map_proj = torch.randn(maps[0], 2, generator=g)

    def __len__(self):
        if self.length is None:
            raise TypeError("the training set is unbounded")
        return self.length

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)  # lets a test kill the run between two checkpoints
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        coarse = torch.randn(1, 1, 4, 4, 4, generator=g)
        volume = F.interpolate(coarse, size=(self.size,) * 3, mode="trilinear", align_corners=False)[0]
        volume = volume + 0.05 * torch.randn(volume.shape, generator=g)
        plane = torch.randint(0, 3, (self.k,), generator=g)
        position = torch.rand(self.k, generator=g)
        feats = []
        for p, t in zip(plane.tolist(), position.tolist()):
            index = min(int(t * self.size), self.size - 1)
            sl = volume[0].select(p, index)  # (size, size)
            regions = F.adaptive_avg_pool2d(sl[None], 2).flatten()
            feats.append(torch.cat([2 * regions, 3 * F.one_hot(torch.tensor(p), 3).float(),
                                    3 * torch.tensor([t, 1 - t])]))
        feats = torch.stack(feats)
        mask = torch.ones(self.k, dtype=torch.bool)
        mask[-1] = int(i) % 3 != 2  # every third item pads its last slice, as a crop with too few cached slices
        item = {"volume": volume.float(), "plane": plane, "position": position.float(), "mask": mask,
                "image_emb": F.normalize(feats @ self.image_map.T, dim=-1),
                "text_emb": F.normalize(feats @ self.text_map.T, dim=-1)}
        if self.maps is not None:
            s = self.maps[1]
            pooled = torch.stack([F.adaptive_avg_pool2d(volume[0].select(p, min(int(t * self.size), self.size - 1))
                                                        [None], s)[0] for p, t in zip(plane.tolist(),
                                                                                      position.tolist())])
            both = torch.stack([pooled, torch.ones_like(pooled)], -1)  # (K, S, S, 2)
            item["map_target"] = (both @ self.map_proj.T).permute(0, 3, 1, 2).contiguous()  # (K, C, S, S)
            item["map_valid"] = torch.ones(self.k, s, s, dtype=torch.bool)
            item["map_valid"][:, 0] = int(i) % 2 == 0  # odd items: the first row outside the volume (unequal counts)
        return item


def tiny_psat_kwargs(in_dim: int, out_dim: int = 16) -> dict:
    return dict(in_dim=in_dim, width=32, depth=2, heads=4, num_queries=6, out_dim=out_dim, num_slice_bins=16,
                dropout=0.0)


def tiny_backbone(name: str, seed: int = 0, **overrides):
    """A tiny real backbone of ``name`` (see TINY_BACKBONES), built with a fixed seed."""
    from med3dinsight_plugin import build_backbone

    torch.manual_seed(seed)
    kwargs = {**TINY_BACKBONES[name], **overrides}
    return build_backbone(name, **kwargs)


def swin_ssl_state_dict(swin_vit_state: dict) -> dict:
    """MONAI's official SwinUNETR SSL file layout (model_swinvit.pt) made from a SwinUNETR's swinViT weights:
    ``module.``-prefixed keys without ``swinViT``, timm's ``mlp.fc1/fc2`` names, and an extra final norm."""
    sd = {"module." + k.replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2."): v.clone()
          for k, v in swin_vit_state.items()}
    width = max(v.shape[0] for k, v in swin_vit_state.items() if k.endswith("reduction.weight"))
    sd["module.norm.weight"], sd["module.norm.bias"] = torch.ones(width), torch.zeros(width)
    return {"epoch": 100, "state_dict": sd}



def tiny_pretrain_config(backbone: str, patch_size=None, alignment: str = "ot", seed: int = 0, **sections):
    """The :class:`PretrainConfig` of a tiny real model: the TINY_BACKBONES configuration of ``backbone`` (at
    ``patch_size``, default its own), the ``small`` PSAT shrunk to tiny_psat_kwargs, ``alignment``; ``sections``
    are extra config sections (``train={...}``, ``output=...``)."""
    from med3dinsight_plugin.pretrain.config import PretrainConfig

    kwargs = {k: v for k, v in TINY_BACKBONES[backbone].items() if k != "patch_size"}
    psat = {k: v for k, v in tiny_psat_kwargs(1).items() if k not in ("in_dim", "out_dim")}
    model = {"backbone": backbone, "backbone_kwargs": kwargs, "psat": "small", "psat_kwargs": psat,
             "patch_size": list(patch_size or TINY_BACKBONES[backbone]["patch_size"]), "alignment": alignment,
             "loss_weights": {"image": 1.0, "text": 1.0}, "loss_balance": {"dense": None}}  # the paper's recipe
    train = {"seed": seed, **sections.pop("train", {})}
    return PretrainConfig.from_dict({"model": model, "train": train, **sections})


def tiny_pretrain_batch(patch_size, embed_dim: int, batch: int = 2, slices: int = 4, seed: int = 0, device="cpu"):
    """A deterministic pretraining batch (the keyword arguments of Med3DInsightModel): random volumes of
    ``patch_size``, K slices per volume at random planes/positions, unit teacher embeddings, the last slice of the
    last volume masked out as padding."""
    g = torch.Generator().manual_seed(seed)
    b, k = batch, slices
    emb = torch.nn.functional.normalize(torch.randn(2, b, k, embed_dim, generator=g), dim=-1)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[-1, -1] = False
    out = {"volume": torch.randn(b, 1, *patch_size, generator=g), "plane": torch.randint(0, 3, (b, k), generator=g),
           "position": torch.rand(b, k, generator=g), "image_emb": emb[0], "text_emb": emb[1], "mask": mask}
    return {name: t.to(device) for name, t in out.items()}


# ------------------------------------------------------------------------------------------ toy pretraining runs

PRETRAIN_TOY_SCRIPT = Path(__file__).parent / "pretrain_toy.py"


def toy_overrides(output, backbone="plain_conv_unet", **train):
    """``--set`` strings of a tiny run (tiny backbone, tiny PSAT, no workers), with ``train`` overrides."""
    import json

    kwargs = {k: v for k, v in TINY_BACKBONES[backbone].items() if k != "patch_size"}
    psat = {k: v for k, v in tiny_psat_kwargs(1).items() if k not in ("in_dim", "out_dim")}
    settings = {"output": str(output), "model.backbone": backbone, "model.backbone_kwargs": kwargs,
                "model.patch_size": list(TINY_BACKBONES[backbone]["patch_size"]), "model.psat": "small",
                "model.psat_kwargs": psat, "model.alignment": "clip", "data.num_workers": 0,
                "train.steps": 6, "train.batch_size": 2, "train.lr": 1e-3, "train.warmup_steps": 2,
                "train.log_every": 1, "train.checkpoint_every": 2, "train.eval_every": 3}
    settings.update({k if "." in k else f"train.{k}": v for k, v in train.items()})
    return [*PAPER_RECIPE, *(f"{k}={json.dumps(v)}" for k, v in settings.items())]


def run_in_process(overrides, eval_cases=4, maps=None, **kwargs):
    """Pretrain on the toy data in this process with the ``--set`` strings ``overrides`` (``maps=(C, S)``: with
    dense targets of C channels on S x S grids); returns ``(config, model, summary)``."""
    from med3dinsight_plugin.pretrain import build_model, load_config, pretrain

    config = load_config(None, overrides)
    model = build_model(config, EMBED, map_shape=None if maps is None else (maps[0], maps[1], maps[1]))
    size = config.model.patch_size[0]
    eval_set = ToyDataset(seed=99, length=eval_cases, size=size, maps=maps) if eval_cases else None
    summary = pretrain(config, model, ToyDataset(size=size, maps=maps), eval_set, progress=False, **kwargs)
    return config, model, summary


def script(overrides, threads=1, delay=0.0, maps=None):
    """Arguments of tests/pretrain_toy.py for a run with ``overrides`` (``maps=(C, S)``: with dense targets)."""
    args = [str(PRETRAIN_TOY_SCRIPT), "--threads", str(threads), "--delay", str(delay)]
    if maps is not None:
        args += ["--maps", str(maps[0]), str(maps[1])]
    return args + [a for o in overrides for a in ("--set", o)]


def final_weights(output):
    """The checkpoint a run with ``output`` wrote at its end."""
    from med3dinsight_plugin import load_checkpoint

    return load_checkpoint(Path(output) / "med3dinsight.safetensors")


def assert_same_weights(a, b, exact=True, atol=1e-5):
    """Two checkpoints hold the same tensors (weights and extras), bit for bit or within ``atol``."""
    pairs = [(a.state_dict, b.state_dict)] + [(a.extras[k], b.extras[k]) for k in a.extras]
    for x, y in pairs:
        assert x.keys() == y.keys()
        for key in x:
            if exact:
                assert torch.equal(x[key], y[key]), key
            else:
                torch.testing.assert_close(x[key], y[key], atol=atol, rtol=0, msg=key)


def one_line_failure(code, err, *needles):
    """Assert a user error: exit code 2 and one line on stderr (notes and the progress bar aside) without a
    traceback, containing every needle; returns the line. ``err``: stderr's lines."""
    assert code == 2, err
    lines = [line for line in err if not line.startswith(("note:", "pretraining:"))]  # notes, the progress bar
    assert len(lines) == 1 and "Traceback" not in lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_tool(cmd, env, check=True, timeout=900):
    """Run an installed command (``med3dinsight``, ``nnUNetv2_*``) of this environment; with ``check``, fail the test
    with the tail of its output when it does not exit 0."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *map(str, cmd[1:])], env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def write_nifti(path, array, affine=None):
    """Save ``array`` as a NIfTI file (identity affine unless given), keeping its dtype."""
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def ct_like(seed=0, shape=(32, 32, 32)):
    """A float32 volume in Hounsfield-like units: noise of sd 100 with a slab of air (-1000) on top."""
    import numpy as np

    a = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 100
    a[:4] = -1000
    return a


def ct_world(root, cases: int = 3):
    """``root/vols``: CT-like NIfTI cases ``case0``, ...; ``root/clip``: a tiny open_clip; ``root/cache``: their
    teacher cache (4 slices per plane), made by ``med3dinsight embed``. Returns ``root``."""
    from med3dinsight_plugin.cli import main
    from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip

    vols = root / "vols"
    vols.mkdir()
    for i in range(cases):
        write_nifti(vols / f"case{i}.nii.gz", ct_like(seed=i))
    clip = save_tiny_open_clip(root / "clip")
    assert main(["embed", str(vols), "-o", str(root / "cache"), "--clip-model", str(clip), "--per-plane", "4",
                 "--modality", "ct"]) == 0
    return root


def interrupted_captioner_class():
    """A real :class:`~med3dinsight_plugin.teacher.captioner.Captioner` whose 3rd ``caption`` call raises
    ``KeyboardInterrupt`` (Ctrl-C in the middle of a run); ``calls`` counts each instance's calls."""
    from med3dinsight_plugin.teacher.captioner import Captioner

    class Interrupted(Captioner):
        calls = 0

        def caption(self, images, prompts):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return super().caption(images, prompts)

    return Interrupted


NNUNET_E2E_DATASET = "991"  # the id of conftest's ``nnunet`` fixture dataset


def carries_pretrained(finetuned, pretrained, prefixes):
    """The fine-tuned encoder is still the pretrained one (a few small steps away from it)."""
    keys = [k for k in pretrained if k.startswith(prefixes) and pretrained[k].is_floating_point()]
    change = sum(float((finetuned[k].float() - pretrained[k].float()).norm() ** 2) for k in keys) ** 0.5
    size = sum(float(pretrained[k].float().norm() ** 2) for k in keys) ** 0.5
    assert keys and change / size < 0.05, change / size
