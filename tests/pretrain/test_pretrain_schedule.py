"""The pretraining learning-rate schedule: torch's schedulers (LinearLR warm-up, then CosineAnnealingLR, PolynomialLR
or ConstantLR, chained by SequentialLR) give ``lr * lr_factor(step)`` at every step; a resumed run rebuilds the
schedule and gets the uninterrupted run's learning rates bit for bit, follows a changed ``train.steps``, and resumes
states saved by the LambdaLR of earlier versions."""
import itertools
import json
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    PolynomialLR,
    SequentialLR,
)

from helpers import EMBED, ToyDataset, run_in_process, toy_overrides
from med3dinsight_plugin.pretrain import build_model, load_config, pretrain
from med3dinsight_plugin.pretrain.config import TrainConfig
from med3dinsight_plugin.pretrain.optim import lr_factor, lr_scheduler


def _optimizer(lr, groups=2):
    """An AdamW over ``groups`` parameter groups, as Med3DInsightModel.param_groups() makes them (one lr for all)."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.AdamW([{"params": [params[0]]}] + [{"params": [p], "weight_decay": 0.0} for p in params[1:]],
                             lr=lr)


def _step(optimizer, scheduler):
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize("schedule, warmup, ratio, steps", list(itertools.product(
    ["cosine", "poly", "constant"], [0, 1, 2, 10], [0.0, 0.1], [0, 1, 10, 60, 400])))
def test_torch_schedule_is_lr_times_lr_factor_at_every_step(schedule, warmup, ratio, steps):
    train = TrainConfig(schedule=schedule, warmup_steps=warmup, min_lr_ratio=ratio, steps=steps, lr=3e-4)
    optimizer = _optimizer(train.lr)
    scheduler = lr_scheduler(optimizer, train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stepping the schedule after the optimizer warns about nothing
        for step in range(steps + 1):
            expected = train.lr * lr_factor(step, train)
            lrs = scheduler.get_last_lr()
            assert lrs == [g["lr"] for g in optimizer.param_groups] and len(set(lrs)) == 1
            assert lrs[0] == pytest.approx(expected, rel=1e-12, abs=1e-12 * train.lr), step
            _step(optimizer, scheduler)


def test_the_schedule_is_made_of_torch_schedulers_starts_above_zero_and_ends_at_min_lr_ratio():
    train = TrainConfig(schedule="poly", warmup_steps=4, min_lr_ratio=0.1, steps=20, lr=1e-3)
    optimizer = _optimizer(train.lr)
    scheduler = lr_scheduler(optimizer, train)
    assert isinstance(scheduler, SequentialLR)
    ramp, decay = scheduler._schedulers
    assert isinstance(ramp, LinearLR) and isinstance(decay, PolynomialLR) and decay.power == 0.9
    assert scheduler.get_last_lr()[0] == pytest.approx(train.lr / 4)  # the first step: lr/warmup, never 0
    lrs = []
    for _ in range(train.steps):
        lrs.append(scheduler.get_last_lr()[0])
        _step(optimizer, scheduler)
    assert max(lrs) == pytest.approx(train.lr) and lrs[3] == pytest.approx(train.lr)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * train.lr)  # min_lr_ratio x lr at train.steps
    kinds = {s: type(lr_scheduler(_optimizer(1e-3), TrainConfig(schedule=s, warmup_steps=0))) for s in
             ("cosine", "poly", "constant")}
    assert kinds["cosine"] is CosineAnnealingLR and kinds["constant"] is ConstantLR
    assert issubclass(kinds["poly"], PolynomialLR)


@pytest.mark.parametrize("schedule", ["cosine", "poly", "constant"])
def test_a_rebuilt_schedule_has_the_uninterrupted_learning_rates_bit_for_bit(schedule):
    """Resuming loads the optimizer's state (its groups' lr mid-schedule, their initial_lr) and rebuilds the schedule
    advanced to the step: the learning rates then and after are exactly the uninterrupted run's."""
    train = TrainConfig(schedule=schedule, warmup_steps=5, min_lr_ratio=0.05, steps=40, lr=2e-4)
    optimizer = _optimizer(train.lr)
    scheduler = lr_scheduler(optimizer, train)
    uninterrupted, saved = [], {}
    for step in range(train.steps):
        if step in (3, 5, 6, 17):  # inside the warm-up, at its end, after it
            saved[step] = optimizer.state_dict()
        uninterrupted.append(scheduler.get_last_lr()[0])
        _step(optimizer, scheduler)
    for start, state in saved.items():
        resumed = _optimizer(train.lr)
        resumed.load_state_dict(state)
        rebuilt = lr_scheduler(resumed, train, start)
        lrs = []
        for _ in range(start, train.steps):
            lrs.append(rebuilt.get_last_lr()[0])
            assert [g["lr"] for g in resumed.param_groups] == [lrs[-1]] * 2
            _step(resumed, rebuilt)
        assert lrs == uninterrupted[start:], start


def test_a_rebuilt_schedule_follows_a_changed_number_of_steps():
    before, after = TrainConfig(steps=30, warmup_steps=4), TrainConfig(steps=60, warmup_steps=4)
    optimizer = _optimizer(before.lr)
    scheduler = lr_scheduler(optimizer, before)
    for _ in range(20):
        _step(optimizer, scheduler)
    resumed = _optimizer(before.lr)
    resumed.load_state_dict(optimizer.state_dict())
    fresh = lr_scheduler(_optimizer(after.lr), after, 20)
    assert lr_scheduler(resumed, after, 20).get_last_lr() == fresh.get_last_lr()
    assert fresh.get_last_lr()[0] == pytest.approx(after.lr * lr_factor(20, after), rel=1e-12)


def test_parameter_groups_with_different_learning_rates_are_refused():
    """The schedule's minimum (eta_min) is absolute: one for every group is right only if they share a base lr."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match="one base learning rate for every parameter group"):
        lr_scheduler(optimizer, TrainConfig())


def test_a_resumed_run_logs_the_uninterrupted_learning_rates_of_its_new_schedule(tmp_path):
    """3 steps, then resumed with train.steps 6 (a resumable change): the resumed steps log exactly the learning
    rates of a run that had 6 steps from the start."""
    whole = tmp_path / "whole"
    run_in_process(toy_overrides(whole, steps=6, warmup_steps=1, checkpoint_every=3), eval_cases=0)
    split = tmp_path / "split"
    run_in_process(toy_overrides(split, steps=3, warmup_steps=1, checkpoint_every=3), eval_cases=0)
    _, _, summary = run_in_process(toy_overrides(split, steps=6, warmup_steps=1, checkpoint_every=3), eval_cases=0)
    assert summary.start_step == 3

    def lrs(folder):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in records if "lr" in r}

    whole_lrs, split_lrs = lrs(whole), lrs(split)
    assert [split_lrs[s] for s in (4, 5, 6)] == [whole_lrs[s] for s in (4, 5, 6)]
    assert split_lrs[3] != whole_lrs[3]  # the first 3 steps followed the 3-step schedule


def test_a_state_saved_by_the_old_lambdalr_schedule_resumes(tmp_path):
    """Runs saved by earlier versions hold a LambdaLR's state: it is not needed, the schedule is rebuilt."""
    config = load_config(None, toy_overrides(tmp_path, steps=2, checkpoint_every=2, warmup_steps=4))
    size = config.model.patch_size[0]
    pretrain(config, build_model(config, EMBED), ToyDataset(size=size), None, progress=False)
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    groups = len(state["optimizer"]["param_groups"])
    optimizer = _optimizer(config.train.lr, groups)
    old = LambdaLR(optimizer, lambda s: lr_factor(s, config.train))  # what earlier versions built and saved
    for _ in range(2):
        _step(optimizer, old)
    state["scheduler"] = old.state_dict()
    torch.save(state, last)
    config = load_config(None, toy_overrides(tmp_path, steps=4, checkpoint_every=2, warmup_steps=4))
    summary = pretrain(config, build_model(config, EMBED), ToyDataset(size=size), None, progress=False)
    assert summary.start_step == 2 and summary.steps == 4
    resumed = torch.load(last, weights_only=True)
    assert [g["lr"] for g in resumed["optimizer"]["param_groups"]] == \
        pytest.approx([config.train.lr * lr_factor(4, config.train)] * groups)
    assert resumed["scheduler"]["last_epoch"] == 4
