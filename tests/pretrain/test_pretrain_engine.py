"""Pretraining engine on CPU with real tiny models: DDP equals one process, kill -9 + resume is bit-identical, the
model learns a toy task, configs are validated, unused parameters are frozen, and the run folder is complete."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    EMBED,
    TINY_BACKBONES,
    ToyDataset,
    assert_same_weights,
    final_weights,
    run_in_process,
    script,
    toy_overrides,
)
from med3dinsight_plugin import load_checkpoint
from med3dinsight_plugin.pretrain import (
    ConfigError,
    build_model,
    load_config,
    lr_factor,
    pretrain,
    retrieval_metrics,
    save_config,
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One short run that learns the toy task (its folder is inspected by several tests)."""
    out = tmp_path_factory.mktemp("toy_run")
    overrides = toy_overrides(out, steps=80, eval_every=20, log_every=5, checkpoint_every=40, warmup_steps=5,
                              schedule="constant", lr=2e-3)
    config, model, summary = run_in_process(overrides, eval_cases=8, metadata={"teacher": {"name": "toy"}})
    return {"out": out, "config": config, "model": model, "summary": summary, "overrides": overrides}


# ------------------------------------------------------------------------------------------------- correctness

@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x batch 1 (gloo) against 1 process x batch 2, three steps from the same initialisation.

    The gradients (all-reduced, of the last step) must agree to float rounding. The weights are compared after
    three steps of SGD (train.optimizer=sgd: Nesterov momentum 0.99), whose update is linear in the gradients, so
    the weights can differ by at most lr x (the summed momentum coefficients of the gradients) x (the gradient
    difference): a bound that follows from the gradient check, far below how far the weights move. (Adam would not
    do: it normalises rounding noise in gradients that are zero in exact arithmetic -- conv biases before
    InstanceNorm -- into steps of a full lr, in either direction.)
    """
    lr, mu, steps = 1e-2, 0.99, 3
    run = dict(steps=steps, warmup_steps=0, checkpoint_every=0, eval_every=0, lr=lr, optimizer="sgd",
               **{"model.alignment": "ot"})
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script(toy_overrides(ddp_out, batch_size=1, **run)), "--grads", str(tmp_path / "grads.pt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    config, model, summary = run_in_process(toy_overrides(single_out, batch_size=2, **run), eval_cases=0)
    assert summary.global_batch == 2 and summary.steps == 3
    assert final_weights(ddp_out).metadata["pretraining"]["world_size"] == 2

    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    single_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ddp_grads.keys() == single_grads.keys()
    grad_atol, grad_rtol = 2e-6, 1e-3
    for name, grad in single_grads.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=grad_rtol, atol=grad_atol, msg=name)

    # Nesterov SGD adds d_t = g_t + mu * b_t, b_t = sum_{i<=t} mu^(t-i) g_i: after T steps gradient g_i has entered
    # the weights with the coefficient 1 + mu + ... + mu^(T-i+1); weight decay (L2) adds a term linear in the (tiny)
    # weight difference. So |w_ddp - w_single| <= lr * (sum of the coefficients) * (largest gradient difference),
    # the gradient difference bounded as checked above, taking each tensor's gradients over three small steps to
    # be at most twice the last step's.
    coefficients = sum(1 + sum(mu ** j for j in range(1, steps - i + 2)) for i in range(1, steps + 1))
    ddp, single = final_weights(ddp_out), final_weights(single_out)
    initial = build_model(config, EMBED).state_dict()
    trained = model.state_dict(keep_vars=True)  # every key, aliases included, with its parameter's gradient
    ratios = []
    prefixes = {"": "backbone.network.", "reconstruction_head": "backbone.reconstruction_head."}
    for part in [""] + list(single.extras):
        prefix = prefixes.get(part, f"{part}.")
        mine, theirs = (single.extras[part], ddp.extras[part]) if part else (single.state_dict, ddp.state_dict)
        for key, value in mine.items():
            grad = getattr(trained[prefix + key], "grad", None)
            if grad is None:  # frozen (no gradient): never updated on either side
                assert torch.equal(theirs[key], value), key
                continue
            atol = lr * coefficients * (grad_atol + grad_rtol * 2 * float(grad.abs().max()))
            torch.testing.assert_close(theirs[key], value, atol=atol, rtol=0, msg=key)
            ratios.append(float((value - initial[prefix + key]).abs().max()) / atol)
    assert max(ratios) > 100, max(ratios)  # the bound is far tighter than how far the weights moved

    # Control: without gathering across ranks (each rank aligning only its own pairs), the gradients differ far
    # beyond the tolerance above, so the check does detect a missing or gradient-less gather.
    data = ToyDataset()
    batch = {k: torch.stack([data[4][k], data[5][k]]) for k in data[4]}  # the samples of the last step
    assert not batch["mask"].all()  # sample 5 pads a slice: the gathered masks must line up with the pairs
    per_rank = []
    for half in (slice(0, 1), slice(1, 2)):
        model.zero_grad()
        model(**{k: v[half] for k, v in batch.items()})["loss"].backward()
        per_rank.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    model(**batch)["loss"].backward()
    head = "psat.head.weight"
    ungathered = (per_rank[0][head] + per_rank[1][head]) / 2
    assert (ungathered - model.psat.head.weight.grad).abs().max() > 100 * 2e-6 + 1e-3 * ungathered.abs().max()


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # PSAT dropout on: the resumed run must continue the random stream where the checkpoint left it
    run = dict(steps=12, checkpoint_every=3, eval_every=6, log_every=1,
               **{"model.alignment": "ot", "model.psat_kwargs.dropout": 0.1})
    ref_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen([sys.executable, *script(toy_overrides(ref_out, **run))], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, *script(toy_overrides(killed_out, **run), delay=0.1)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = killed_out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not state.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 0 < killed_at < 12 and not (killed_out / "med3dinsight.safetensors").exists()
    # resume with 2 loader workers: the batches depend on the step only, not on the worker count
    resumed = subprocess.run([sys.executable, *script(toy_overrides(killed_out, **run, **{"data.num_workers": 2}))],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.splitlines()[-1])["start_step"] == killed_at
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    assert_same_weights(final_weights(ref_out), final_weights(killed_out), exact=True)
    # the log was rewound to the checkpoint: every step once, in order
    steps = [json.loads(line)["step"] for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [json.loads(line)["step"] for line in (killed_out / "metrics.jsonl").read_text().splitlines()
                   if "loss" in json.loads(line)]
    assert train_steps == list(range(1, 13)) and steps == sorted(steps)


@pytest.mark.slow
def test_the_loss_falls_and_retrieval_rises_above_chance(toy_run):
    records = [json.loads(line) for line in (toy_run["out"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval/image_top1" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    first, last = evals[0], evals[-1]
    real_slices = sum(int(ToyDataset(seed=99)[i]["mask"].sum()) for i in range(8))  # 8 cases x 4, less padding
    assert first["step"] == 0 and last["step"] == 80 and last["eval/chance_top1"] == 1 / real_slices == 1 / 30
    chance1, chance5 = last["eval/chance_top1"], last["eval/chance_top5"]
    for teacher in ("image", "text"):
        assert last[f"eval/{teacher}_top1"] >= 3 * chance1 and last[f"eval/{teacher}_top5"] >= 3 * chance5, last
        assert last[f"eval/{teacher}_top1"] > first[f"eval/{teacher}_top1"]
    assert (last["eval/image_top1"] + last["eval/text_top1"]) / 2 >= 5 * chance1, last
    assert toy_run["summary"].eval["image_top1"] == evals[-1]["eval/image_top1"]


def test_retrieval_metrics_on_known_embeddings():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    text = F.normalize(image + 0.01 * torch.randn(10, 8, generator=g) + 1.0, dim=-1)
    m = retrieval_metrics(image.clone(), image, text)
    assert m["image_top1"] == 1.0 and m["image_top5"] == 1.0 and m["chance_top1"] == 0.1 and m["chance_top5"] == 0.5
    assert m["gap_z3d_image"] < 1e-6 and m["modality_gap"] > 0.5
    shifted = retrieval_metrics(image.roll(1, 0), image)  # every prediction points at its neighbour's slice
    assert shifted["image_top1"] == 0.0 and "text_top1" not in shifted


# ------------------------------------------------------------------------------------------------------ config

def test_config_defaults_overrides_and_round_trip(tmp_path):
    config = load_config(None, ["train.lr=3e-4", "model.patch_size=[64,64,64]", "model.loss_weights.text=0",
                                "model.backbone_kwargs.feature_size=24"])
    assert config.train.lr == 3e-4 and config.model.patch_size == [64, 64, 64]
    assert config.model.loss_weights.text == 0.0 and config.model.backbone_kwargs == {"feature_size": 24}
    assert config.train.steps == 10000 and config.train.betas == [0.9, 0.999] and config.data.slices_per_sample == 8
    save_config(config, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml").to_dict() == config.to_dict()


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr_rate: 0.1\n", "unknown key 'train.lr_rate' in run.yaml; did you mean 'train.lr'?"),
    ("model:\n  pach_size: [8, 8, 8]\n", "unknown key 'model.pach_size' in run.yaml; did you mean 'model.patch_size'?"),
    ("train:\n  steps: abc\n", "'train.steps' in run.yaml must be an integer >= 0, got 'abc'"),
    ("train:\n  steps: -5\n", "'train.steps' in run.yaml must be an integer >= 0, got -5"),
    ("train:\n  batch_size: 0\n", "'train.batch_size' in run.yaml must be an integer >= 1, got 0"),
    ("train:\n  schedule: linear\n", "'train.schedule' in run.yaml must be one of 'cosine', 'poly', 'constant'"),
    ("train:\n  amp: fp32\n", "'train.amp' in run.yaml must be one of 'auto', 'bf16', 'fp16', 'off'"),
    ("model:\n  patch_size: [64, 64]\n", "'model.patch_size' in run.yaml must be a list of 3 integers"),
    ("train: 3\n", "'train' in run.yaml must be a mapping"),
    ("- 1\n", "must hold a mapping of sections"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "run.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_override_errors_name_set():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stpes' in --set; did you mean 'train\.steps'\?"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="'data.augment' in --set must be true or false"):
        load_config(None, ["data.augment=maybe"])
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_lr_schedule():
    train = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, train) == pytest.approx(0.1) and lr_factor(9, train) == pytest.approx(1.0)
    assert lr_factor(10, train) == pytest.approx(1.0) and lr_factor(100, train) == pytest.approx(0.1)
    assert lr_factor(55, train) == pytest.approx(0.55)  # cosine half way: 0.1 + 0.9 * 0.5
    train.schedule = "poly"
    assert lr_factor(55, train) == pytest.approx(0.1 + 0.9 * 0.5 ** 0.9)
    train.schedule = "constant"
    assert lr_factor(99, train) == 1.0


def test_resume_with_a_changed_config_is_refused_but_more_steps_are_allowed(toy_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(toy_run["out"], out)
    changed = [o for o in toy_run["overrides"] if not o.startswith("output=")] + [f"output={json.dumps(str(out))}"]
    with pytest.raises(ConfigError, match=r"different configuration \(train\.lr, train\.schedule differ\); use a "
                                          r"new output folder"):
        run_in_process(changed + ["train.lr=0.01", "train.schedule=cosine"])
    _, _, summary = run_in_process(changed + ["train.steps=82"], eval_cases=0)
    assert summary.start_step == 80 and summary.steps == 82


def test_on_start_failure_aborts_before_training(tmp_path):
    def refuse(model):
        raise RuntimeError("the downstream network does not accept these weights")

    with pytest.raises(RuntimeError, match="does not accept"):
        run_in_process(toy_overrides(tmp_path), on_start=refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_bad_metadata_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"metadata keys \['backbone'\] are reserved"):
        run_in_process(toy_overrides(tmp_path / "a"), metadata={"backbone": "mine"})
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        run_in_process(toy_overrides(tmp_path / "b"), metadata={"spacing": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- freezing and outputs

@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(TINY_BACKBONES))
def test_every_trainable_parameter_gets_a_gradient_after_one_step(tmp_path, backbone):
    _, model, _ = run_in_process(toy_overrides(tmp_path, backbone=backbone, steps=1, batch_size=1), eval_cases=0)
    frozen = {f"backbone.network.{n}" for n in model.backbone.unused_in_pretraining()}
    params = dict(model.named_parameters())
    assert frozen and {n for n, p in params.items() if not p.requires_grad} == frozen
    assert [n for n, p in params.items() if p.requires_grad and p.grad is None] == []


def test_run_folder_holds_logs_plots_and_a_loadable_checkpoint(toy_run):
    out = toy_run["out"]
    for name in ("config.yaml", "metrics.jsonl", "metrics.png", "checkpoints/last.pt", "med3dinsight.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(out / "config.yaml").to_dict() == toy_run["config"].to_dict()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert {"step", "lr", "loss", "image", "text", "reconstruction", "grad_norm", "samples_per_s"} <= set(record)
    ckpt = load_checkpoint(out / "med3dinsight.safetensors")
    assert ckpt.source_format == "med3dinsight" and ckpt.metadata["pretraining"]["steps"] == 80
    assert ckpt.metadata["teacher"] == {"name": "toy"} and ckpt.metadata["pretraining"]["global_batch"] == 2
    assert ckpt.metadata["pretraining"]["config"] == toy_run["config"].to_dict()
    for key, value in toy_run["model"].backbone.network.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value), key
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 80 and {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(state)
    assert toy_run["summary"].checkpoint == str(out / "med3dinsight.safetensors")
    assert toy_run["model"].training  # evaluate() handed the model back in train mode


def test_repeated_captions_are_one_answer_and_raise_the_chance_level():
    from med3dinsight_plugin.pretrain.diagnostics import retrieval_metrics

    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]]), dim=-1)
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0]] * 3 + [[1.0, 0, 0.2]]), dim=-1)
    m = retrieval_metrics(z, text.clone(), text)
    assert m["text_top1"] == 0.75  # the three slices sharing a caption retrieve it; the fourth does not
    assert m["text_chance_top1"] == pytest.approx((3 * 3 / 4 + 1 / 4) / 4)


# ------------------------------------------------------------------------------- optimizer and CLIP's temperature

@pytest.mark.parametrize("name", ["adamw", "adam_l2"])
def test_adamw_decays_decoupled_and_adam_l2_adds_the_decay_to_the_gradient(name):
    """With a zero gradient, AdamW only shrinks the weight by lr * wd; Adam with coupled L2 (the authors') normalises
    the decay term like a gradient, so its first step moves the weight by about lr."""
    from med3dinsight_plugin.pretrain.config import TrainConfig
    from med3dinsight_plugin.pretrain.engine import _optimizer

    weight = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    frozen_scale = torch.nn.Parameter(torch.tensor([2.0]))
    tc = TrainConfig(optimizer=name, lr=0.1, weight_decay=0.01)
    optimizer = _optimizer([{"params": [weight]}, {"params": [frozen_scale], "weight_decay": 0.0}], tc)
    assert type(optimizer) is {"adamw": torch.optim.AdamW, "adam_l2": torch.optim.Adam}[name]
    weight.grad, frozen_scale.grad = torch.zeros(2), torch.zeros(1)
    optimizer.step()
    if name == "adamw":
        torch.testing.assert_close(weight.detach(), torch.tensor([2.0, -3.0]) * (1 - 0.1 * 0.01))
    else:
        torch.testing.assert_close(weight.detach(), torch.tensor([1.9, -2.9]), atol=1e-5, rtol=0)
    assert frozen_scale.item() == 2.0  # the group without weight decay does not move without a gradient


def test_clip_temperature_is_clamped_after_every_step_and_never_decayed(tmp_path):
    """A temperature beyond CLIP's bound comes back within it (a clamp in forward would leave it there, without
    gradient); its optimizer group has no weight decay. Also runs the authors' optimizer, adam_l2."""
    config = load_config(None, toy_overrides(tmp_path, steps=2, checkpoint_every=1, optimizer="adam_l2",
                                             weight_decay=0.1))
    model = build_model(config, EMBED)
    scale = model.loss.align.log_logit_scale
    with torch.no_grad():
        scale.fill_(model.loss.align.max_log + 1.0)
    pretrain(config, model, ToyDataset(size=config.model.patch_size[0]), None, progress=False)
    assert 0.0 <= scale.item() <= math.log(100.0) + 1e-6
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and len(groups[1]["params"]) == 1
    assert state["config"]["train"]["optimizer"] == "adam_l2"


def test_a_state_saved_with_one_parameter_group_resumes_with_the_temperature_in_its_own(tmp_path):
    """Runs saved before CLIP's temperature had a group without weight decay resume: every parameter keeps its
    moments and the schedule drives both groups."""
    config = load_config(None, toy_overrides(tmp_path, steps=2, checkpoint_every=2, warmup_steps=4))
    old = build_model(config, EMBED)
    old.param_groups = lambda: [{"params": [p for p in old.parameters() if p.requires_grad]}]  # the old layout
    size = config.model.patch_size[0]
    pretrain(config, old, ToyDataset(size=size), None, progress=False)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert len(saved["optimizer"]["param_groups"]) == 1
    config = load_config(None, toy_overrides(tmp_path, steps=4, checkpoint_every=2, warmup_steps=4))
    model = build_model(config, EMBED)
    summary = pretrain(config, model, ToyDataset(size=size), None, progress=False)
    assert summary.start_step == 2 and summary.steps == 4
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [config.train.weight_decay, 0.0]
    # the warm-up went on for both groups (saved at 3/4 of the peak lr, next step at the peak)
    assert groups[0]["lr"] == groups[1]["lr"] == pytest.approx(config.train.lr * lr_factor(4, config.train))
    assert lr_factor(4, config.train) == 1.0
    assert len(state["scheduler"]["_last_lr"]) == 2  # the schedule drives both groups
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {4}  # every parameter's moments were carried over from the 2 saved steps


@pytest.mark.slow
def test_two_process_ddp_averages_dense_distillation_over_the_global_batch(tmp_path):
    """Dense distillation is computed per rank (like reconstruction) but averaged over the global batch's valid
    locations: 2 ranks x batch 1 give the dense head the gradient of 1 process x batch 2, also when the ranks hold
    different numbers of valid locations (the toy data's odd items lose a row). Every step also measures each
    term's encoder gradient before the backward pass, which must leave DDP's reduction alone."""
    run = dict(steps=1, warmup_steps=0, checkpoint_every=0, eval_every=0, lr=1e-2, optimizer="sgd", grad_clip=0,
               **{"model.alignment": "ot", "model.loss_weights.dense": 1.0})
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script(toy_overrides(ddp_out, batch_size=1, **run), maps=(5, 3)), "--grads", str(tmp_path / "grads.pt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    _, model, _ = run_in_process(toy_overrides(single_out, batch_size=2, **run), eval_cases=0, maps=(5, 3))
    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    head = {n: p.grad for n, p in model.named_parameters() if n.startswith("dense_head.")}
    assert head and all(g is not None and g.abs().sum() > 0 for g in head.values())
    for name, grad in head.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    records = [json.loads(line) for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("encoder_grad/dense", 0) > 0 for r in records)
