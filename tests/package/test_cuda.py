"""CUDA readiness: the correctness half of ``python benchmarks/gpu_check.py``.

Every test here is marked ``cuda`` (``pytest -m cuda`` selects them) and runs on the device that
``MED3DINSIGHT_TEST_DEVICE`` names (``cuda``, ``cuda:N`` or ``cpu``); unset, that is CUDA when torch sees a GPU, else
the CPU. Tests with a meaningful CPU variant run on whichever device that is (CI's plain ``pytest`` runs them on the
CPU); the CUDA-only ones skip on the CPU and say why. Asking for CUDA where torch sees none fails every test instead
of skipping. tests/benchmarks/test_benchmarks.py runs the whole check with ``--device cpu --quick``.
"""
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import NNUNET_E2E_DATASET as DATASET
from helpers import carries_pretrained, script, tiny_backbone, tiny_pretrain_batch, tiny_pretrain_config, toy_overrides
from helpers import run_tool as run
from med3dinsight_plugin import build_backbone, save_pretrained
from med3dinsight_plugin.checkpoint import load_checkpoint
from med3dinsight_plugin.pretrain import build_model

BIN = Path(sys.executable).parent
REQUESTED = os.environ.get("MED3DINSIGHT_TEST_DEVICE", "").strip()
DEVICE = REQUESTED or ("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = torch.device(DEVICE).type == "cuda"
EMBED = 16

pytestmark = pytest.mark.cuda


def cuda_only(why: str):
    return pytest.mark.skipif(not ON_CUDA, reason=f"CUDA only: {why} (device {DEVICE}; set "
                                                  f"MED3DINSIGHT_TEST_DEVICE=cuda on a GPU machine)")


@pytest.fixture
def device():
    """The device under test; a failure, not a skip, when CUDA is asked for and torch sees none."""
    if ON_CUDA and not torch.cuda.is_available():
        pytest.fail(f"MED3DINSIGHT_TEST_DEVICE={REQUESTED!r} but torch.cuda.is_available() is False (torch "
                    f"{torch.__version__}, CUDA build {torch.version.cuda})")
    return torch.device(DEVICE)


@pytest.fixture
def exact_fp32():
    """fp32 references without TF32 (cuDNN convolutions use it by default on Ampere and later: a 10-bit mantissa,
    as coarse as fp16, would blur the comparisons below)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _subprocess_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.pop("MED3DINSIGHT_CHECKPOINT", None)
    return env


def _tail(proc_or_text, n=3000):
    if isinstance(proc_or_text, str):
        return proc_or_text[-n:]
    return (proc_or_text.stdout or "")[-n:] + "\n" + (proc_or_text.stderr or "")[-n:]


# ------------------------------------------------------------------------------------------------ nnU-Net on CUDA

@cuda_only("test_nnunet.py runs the same flow with -device cpu")
def test_nnunet_train_and_predict_on_cuda_for_each_family(device, nnunet, tmp_path):
    """nnUNetv2_train -device cuda -tr Med3DInsightTrainer*_smoke for PlainConvUNet, SwinUNETR and UNETR (trained at
    the same time: one GPU holds all three), then nnUNetv2_predict -device cuda. nnU-Net compiles the network on
    CUDA by default, so the trainers load into a torch.compile'd network here (never on the CPU)."""
    env, root = nnunet["env"], nnunet["root"]
    torch.manual_seed(0)
    families = {
        "plain": (build_backbone("nnunet", plans=nnunet["plans"]), "Med3DInsightTrainer_smoke", ()),
        "swin_unetr": (tiny_backbone("swin_unetr"), "Med3DInsightTrainer_SwinUNETR_smoke", ("--adapt-architecture",)),
        "unetr": (tiny_backbone("unetr"), "Med3DInsightTrainer_UNETR_smoke", ("--adapt-architecture",)),
    }
    jobs = {}
    for family, (backbone, trainer, attach_args) in families.items():
        ckpt = save_pretrained(backbone, tmp_path / f"{family}.safetensors")
        plans_name = f"plansCuda_{family}"
        run(["med3dinsight", "nnunet-attach", "-d", DATASET, "-p", "nnUNetPlans", "--checkpoint", ckpt,
             "-n", plans_name, *attach_args], env)
        log = open(tmp_path / f"train_{family}.log", "w")
        cmd = [str(BIN / "nnUNetv2_train"), DATASET, "3d_fullres", "0", "-p", plans_name, "-tr", trainer, "-device",
               "cuda"]
        jobs[family] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, plans_name)
    failures = []
    for family, (proc, log, plans_name) in jobs.items():
        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failures.append(f"{family}: exit {code}\n{_tail((tmp_path / f'train_{family}.log').read_text())}")
    assert not failures, "\n\n".join(failures)

    predictions = {}
    for family, (backbone, trainer, _) in families.items():
        plans_name = jobs[family][2]
        fold = root / "res" / "Dataset991_Tiny" / f"{trainer}__{plans_name}__3d_fullres" / "fold_0"
        report = json.loads((fold / "pretrained_load_report.json").read_text())
        log = next(fold.glob("training_log_*.txt")).read_text()
        assert report["coverage"] == 100.0 and report["applied"], (family, report)
        assert "Pretrained encoder loaded" in log and (fold / "checkpoint_final.pth").is_file(), family
        assert "Learning rates: encoder" in log, family  # the encoder found through the compile wrapper
        weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
        carries_pretrained(weights, backbone.network.state_dict(), backbone.encoder_prefixes)
        out = root / f"pred_cuda_{family}"
        cmd = [str(BIN / "nnUNetv2_predict"), "-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out), "-d", DATASET,
               "-c", "3d_fullres", "-f", "0", "-p", plans_name, "-tr", trainer, "-chk", "checkpoint_final.pth",
               "-device", "cuda", "-npp", "1", "-nps", "1"]
        predictions[family] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True), out)
    import SimpleITK as sitk
    for family, (proc, out) in predictions.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{family}: {_tail(text)}"
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "test000.nii.gz")))
        assert prediction.shape == (30, 32, 34), family


# ----------------------------------------------------------------------------------------------- the demo on CUDA

@cuda_only("test_demo.py runs the demo with --device cpu")
def test_demo_on_cuda(device, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([str(BIN / "med3dinsight"), "demo", "-o", str(out), "--steps", "4", "--device", "cuda"],
                          capture_output=True, text=True, env=_subprocess_env(), timeout=1200)
    assert proc.returncode == 0, _tail(proc)
    assert "== 7/7" in proc.stdout and "Outputs:" in proc.stdout
    for run_folder in ("pretrain_nnunet", "pretrain_swin_unetr"):
        meta = load_checkpoint(out / run_folder / "med3dinsight.safetensors").metadata
        assert meta["pretraining"]["config"]["train"]["device"] == "cuda"
        rows = [json.loads(line) for line in (out / run_folder / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    fold = next((out / "nnUNet_results").glob("Dataset977_Demo/Med3DInsightTrainer_smoke__*/fold_0"))
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "pretrained_load_report.json").is_file()


# ------------------------------------------------------------------------------------------- torchrun with NCCL

@cuda_only("test_pretrain_engine.py runs 2 gloo processes on the CPU")
def test_pretraining_under_torchrun_on_every_gpu_then_resume(device, tmp_path):
    """One process per GPU (NCCL when there are several; a single process when there is one GPU), fp16 with the
    engine's GradScaler, a checkpoint every 2 steps; then the same command with more steps resumes from it."""
    gpus = torch.cuda.device_count()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(steps):
        overrides = toy_overrides(out, steps=steps, checkpoint_every=2, eval_every=2, log_every=1, device="cuda",
                                  amp="fp16", **{"model.alignment": "ot"})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               *script(overrides)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, _tail(done)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = launch(4)
    assert first["steps"] == 4 and first["start_step"] == 0 and first["global_batch"] == 2 * gpus
    assert first["losses"] and all(math.isfinite(v) for v in first["losses"].values()), first["losses"]
    meta = load_checkpoint(out / "med3dinsight.safetensors").metadata
    assert meta["pretraining"]["world_size"] == gpus
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["scaler"] and state["scaler"]["scale"] > 0 and state["rng"][0]["cuda"] is not None
    second = launch(6)
    assert second["start_step"] == 4 and second["steps"] == 6
    assert all(math.isfinite(v) for v in second["losses"].values()), second["losses"]


# --------------------------------------------------------------------------------------------- mixed precision

# Unit roundoff u of the 16-bit formats: bf16 keeps 8 significant bits (u = 2^-8 = 3.9e-3), fp16 11 (u = 4.9e-4).
# Losses: each term within 4u of fp32 (measured on the CPU, torch 2.14, these tiny models, 3 seeds: bf16 <= 1.7e-3,
# fp16 <= 3e-4). Gradients, as one vector, relative error ||g - g32|| / ||g32||: the alignment's plan is
# exp(-C / reg), so rounding of the costs reaches the gradient amplified by 1/reg = 33 (u/reg: bf16 0.13, fp16
# 0.016), and the tiny backbones' bottleneck normalises over a few voxels. Measured: bf16 <= 0.075, fp16 <= 0.03;
# limits with about 3x margin. A gradient left scaled by GradScaler (x 65536), zeroed, or flowing through a
# half-precision OT solve is far outside them.
LOSS_RTOL = {torch.bfloat16: 4 * 2 ** -8, torch.float16: 4 * 2 ** -11}
GRAD_RTOL = {torch.bfloat16: 0.25, torch.float16: 0.1}
AMP_FAMILIES = [
    pytest.param("plain_conv_unet", None, id="plain_conv_unet"),
    pytest.param("unetr", None, id="unetr"),
    # 96^3: at 64^3 SwinUNETR's bottleneck is 2^3 voxels, whose InstanceNorm turns rounding into gradient noise
    # (bf16 relative gradient error 0.34 there, 0.05 at 96^3); and a step takes ~20 s on a 2-core CPU.
    pytest.param("swin_unetr", (96, 96, 96), id="swin_unetr",
                 marks=cuda_only("SwinUNETR at 96^3 takes about a minute per step on a 2-core CPU")),
]


def _model_and_batch(name, patch, device, seed=0):
    config = tiny_pretrain_config(name, patch_size=patch, seed=seed)
    model = build_model(config, EMBED).to(device).train()
    batch = tiny_pretrain_batch(config.model.patch_size, EMBED, seed=seed, device=device)
    return model, batch


def _forward_backward(model, batch, dtype=None, scale=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(batch["volume"].device.type, dtype=dtype, enabled=dtype is not None):
        losses = model(**batch)
    (scale(losses["loss"]) if scale else losses["loss"]).backward()
    return {k: float(v.detach()) for k, v in losses.items()}


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(losses, grads, ref_losses, ref_grads, loss_rtol, grad_rtol):
    assert losses.keys() == ref_losses.keys() and grads.keys() == ref_grads.keys()
    for key, ref in ref_losses.items():
        assert math.isfinite(losses[key]), (key, losses)
        assert abs(losses[key] - ref) <= loss_rtol * abs(ref), (key, losses[key], ref, loss_rtol)
    bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    g = torch.cat([grads[n].flatten() for n in ref_grads])
    g_ref = torch.cat([t.flatten() for t in ref_grads.values()])
    error = float((g - g_ref).norm() / g_ref.norm())
    assert error <= grad_rtol, f"relative gradient error {error:.3g} > {grad_rtol}"
    return error


@pytest.mark.parametrize("name,patch", AMP_FAMILIES)
def test_bf16_autocast_step_matches_fp32(device, exact_fp32, name, patch):
    """A pretraining step (build_model: backbone + PSAT + partial-OT image/text alignment + reconstruction) under
    bf16 autocast, as the engine runs on CUDA, against the same step in fp32."""
    model, batch = _model_and_batch(name, patch, device)
    ref_losses = _forward_backward(model, batch)
    ref_grads = _grads(model)
    losses = _forward_backward(model, batch, torch.bfloat16)
    _compare(losses, _grads(model), ref_losses, ref_grads, LOSS_RTOL[torch.bfloat16], GRAD_RTOL[torch.bfloat16])


@cuda_only("GradScaler exists for CUDA's fp16; fp16 autocast on the CPU is neither fast nor what users run")
@pytest.mark.parametrize("name,patch", AMP_FAMILIES)
def test_fp16_gradscaler_step_matches_fp32(device, exact_fp32, name, patch):
    """The engine's fp16 path: autocast fp16, GradScaler (default initial scale 2^16), unscale_, then the optimizer
    step; steps the scaler skips for overflowing gradients leave the weights alone until one is taken."""
    model, batch = _model_and_batch(name, patch, device)
    ref_losses = _forward_backward(model, batch)
    ref_grads = _grads(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    for attempt in range(24):
        before = [p.detach().clone() for p in params]
        losses = _forward_backward(model, batch, torch.float16, scale=scaler.scale)
        scaler.unscale_(optimizer)
        grads = _grads(model)
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        scaler.step(optimizer)
        scaler.update()
        moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        assert moved == finite, f"attempt {attempt}: finite gradients {finite} but weights moved {moved}"
        if finite:
            break
        assert all(torch.equal(b, p.detach()) for b, p in zip(before, params))
    else:
        pytest.fail(f"GradScaler skipped 24 steps (scale now {scaler.get_scale()})")
    _compare(losses, grads, ref_losses, ref_grads, LOSS_RTOL[torch.float16], GRAD_RTOL[torch.float16])


# ------------------------------------------------------------------------------------------------ torch.compile

def _cxx():
    """The C++ compiler inductor would use on the CPU, or None."""
    return shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")


def test_compiled_step_matches_eager(device, exact_fp32):
    """What ``train.compile`` does (backbone.compile() and psat.compile() in place) against eager, fp32.

    On CUDA both are compiled. On the CPU (inductor needs a C++ compiler) only PSAT is: the PlainConvUNet's
    C++ build takes about 100 s on 2 cores, PSAT's about 5 s. Inductor reorders and fuses reductions: losses within
    1e-4 relative (float32 rounding, x 33 through the OT plan), the gradient vector within 1e-3."""
    if not ON_CUDA and not _cxx():
        pytest.skip("torch.compile (inductor) on the CPU needs a C++ compiler (g++/c++ or $CXX); none found")
    eager, batch = _model_and_batch("plain_conv_unet", None, device)
    compiled = copy.deepcopy(eager)
    compiled.psat.compile()
    if ON_CUDA:
        compiled.backbone.compile()
    ref_losses = _forward_backward(eager, batch)
    ref_grads = _grads(eager)
    for _ in range(2):  # the first call compiles, the second runs the cached graphs
        losses = _forward_backward(compiled, batch)
        grads = {n.replace("_orig_mod.", ""): g for n, g in _grads(compiled).items()}
        _compare(losses, grads, ref_losses, ref_grads, 1e-4, 1e-3)


# ----------------------------------------------------------------------------------------------- partial OT

@pytest.mark.parametrize("n", [16, 64])
def test_ot_on_the_device_matches_float64_on_the_cpu(device, n):
    """med3dinsight_plugin.ot on the device (on CUDA: the compiled blocks) against the float64 CPU solver, two
    problems batched as the loss batches its image and text terms: float64 plan to 1e-6 with POT's 1000 iterations,
    float32 plan with the loss's settings to 1e-5, and the float64 gradient of the loss through the plan."""
    from med3dinsight_plugin.ot import entropic_partial_wasserstein, log_entropic_partial_wasserstein

    rng = np.random.default_rng(n)
    M = torch.tensor(rng.random((2, n, n)))
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    reference = entropic_partial_wasserstein(a, a, M, 0.03, 0.95)
    plan64 = entropic_partial_wasserstein(a.to(device), a.to(device), M.to(device), 0.03, 0.95)
    assert plan64.device.type == device.type and plan64.dtype == torch.float64
    assert float((plan64.cpu() - reference).abs().max()) <= 1e-6
    plan32 = entropic_partial_wasserstein(a.float().to(device), a.float().to(device), M.float().to(device), 0.03, 0.95,
                                          stopThr=1e-7)
    assert plan32.dtype == torch.float32 and float((plan32.cpu().double() - reference).abs().max()) <= 1e-5

    def loss_grad(cost, dev):
        cost = cost.to(dev).requires_grad_(True)
        w = a.to(dev)
        log_plan = log_entropic_partial_wasserstein(w, w, cost, 0.03, 0.95, stopThr=1e-9)
        (-log_plan.diagonal(dim1=-2, dim2=-1).mean()).backward()
        return cost.grad.cpu()

    g_ref, g = loss_grad(M, "cpu"), loss_grad(M, device)
    assert bool(torch.isfinite(g).all())
    assert float((g - g_ref).norm() / g_ref.norm()) <= 1e-6


# ------------------------------------------------------------------------------------------- teacher embeddings

@cuda_only("ClipTeacher runs fp32 on the CPU whatever precision is asked for (half precision is slow there)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_clip_teacher_half_precision_embeddings_match_fp32(device, exact_fp32, tmp_path, precision):
    """The real ClipTeacher, loading the tiny open_clip model from its folder, embeds rendered-size uint8 slices and
    captions under autocast: every embedding within cosine 0.999 of fp32."""
    from med3dinsight_plugin.teacher.clip import ClipTeacher
    from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip

    folder = save_tiny_open_clip(tmp_path / "clip")
    full = ClipTeacher(str(folder), device=DEVICE, precision="fp32")
    half = ClipTeacher(str(folder), device=DEVICE, precision=precision)
    assert half.precision == precision
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (full.image_size, full.image_size, 3), dtype=np.uint8) for _ in range(16)]
    texts = [f"w{i} w{i + 1} w{(3 * i) % 88}" for i in range(16)]
    for z, z_ref in ((half.encode_images(images), full.encode_images(images)),
                     (half.encode_texts(texts), full.encode_texts(texts))):
        assert z.dtype == torch.float32 and z.device.type == "cuda" and z.shape == z_ref.shape
        cosine = (z * z_ref).sum(-1)
        assert float(cosine.min()) >= 0.999, cosine.min()
