"""Per-term encoder-gradient norms and loss weights set from them (model.loss_balance)."""
import json

import pytest
import torch

from helpers import (
    EMBED,
    assert_same_weights,
    final_weights,
    run_in_process,
    tiny_pretrain_batch,
    tiny_pretrain_config,
    toy_overrides,
)
from med3dinsight_plugin.balance import balanced_weights, encoder_parameters, term_gradient_norms
from med3dinsight_plugin.errors import Med3DInsightError
from med3dinsight_plugin.pretrain import build_model


def test_balanced_weights_known_answer():
    weights = {"image": 1.0, "text": 1.0, "reconstruction": 2.0, "dense": 0.0}
    norms = {"image": 0.5, "text": 4.0, "reconstruction": 3.0, "dense": 1.5}
    out = balanced_weights(norms, weights, {"image": 0.5, "dense": 1.0})
    # image: 0.5 * (2 * 3) / 0.5 = 6; dense: 1 * 6 / 1.5 = 4; text and reconstruction kept
    assert out == {"image": 6.0, "text": 1.0, "reconstruction": 2.0, "dense": 4.0}
    with pytest.raises(Med3DInsightError, match="reconstruction"):
        balanced_weights(norms, {**weights, "reconstruction": 0.0}, {"image": 0.5})
    with pytest.raises(Med3DInsightError, match="loss_balance.text"):
        balanced_weights({**norms, "text": 0.0}, weights, {"text": 0.5})


def test_term_gradient_norms_equal_each_term_backpropagated_alone():
    config = tiny_pretrain_config("plain_conv_unet")
    model = build_model(config, EMBED)
    losses = model(**tiny_pretrain_batch(model.backbone.patch_size, EMBED))
    params = encoder_parameters(model)
    assert params and all(p.requires_grad for p in params)
    weights = {"image": 2.0, "text": 0.5, "reconstruction": 1.0}
    norms = term_gradient_norms(losses, weights, params)
    assert set(norms) == {"image", "text", "reconstruction"}
    assert all(p.grad is None for p in params)  # nothing accumulated
    for term in norms:
        model.zero_grad(set_to_none=True)
        (weights[term] * losses[term]).backward(retain_graph=True)
        expected = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
        torch.testing.assert_close(norms[term], expected, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_loss_balance_sets_the_weights_from_the_first_batch_and_a_resume_keeps_them(tmp_path):
    common = dict(schedule="constant", warmup_steps=0, checkpoint_every=2, log_every=1, eval_every=0)
    balance = ["model.loss_balance.image=0.5", "model.loss_balance.text=0.25", "model.alignment=\"ot\""]
    _, model, _ = run_in_process(toy_overrides(tmp_path / "whole", steps=4, **common) + balance, eval_cases=0)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    w, g = ({k.split("/")[1]: v for k, v in first.items() if k.startswith(p)}
            for p in ("loss_weight/", "encoder_grad_unweighted/"))
    assert w["reconstruction"] == 1.0 and w["image"] != 1.0
    assert w["image"] * g["image"] == pytest.approx(0.5 * w["reconstruction"] * g["reconstruction"], rel=1e-6)
    assert w["text"] * g["text"] == pytest.approx(0.25 * w["reconstruction"] * g["reconstruction"], rel=1e-6)
    assert model.loss.weights["image"] == pytest.approx(w["image"])
    assert final_weights(tmp_path / "whole").metadata["alignment"]["weights"]["image"] == pytest.approx(w["image"])
    logged = [r for r in records if "encoder_grad/image" in r]
    assert len(logged) == 4 and all(r["encoder_grad/reconstruction"] > 0 for r in logged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard")).Reload()  # the same scalars in TensorBoard
    tags = set(events.Tags()["scalars"])
    assert {"encoder_grad/image", "encoder_grad/text", "encoder_grad/reconstruction", "loss_weight/image"} <= tags
    assert len(events.Scalars("encoder_grad/image")) == 4

    # a run stopped after 2 steps and resumed ends with the same weights, bit for bit: the balanced weights come
    # back from the training state (the config alone would give the weights 1)
    run_in_process(toy_overrides(tmp_path / "split", steps=2, **common) + balance, eval_cases=0)
    _, resumed, summary = run_in_process(toy_overrides(tmp_path / "split", steps=4, **common) + balance,
                                         eval_cases=0)
    assert summary.start_step == 2 and resumed.loss.weights == model.loss.weights
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "split"))


def test_loss_balance_needs_a_reconstruction_term(tmp_path):
    overrides = toy_overrides(tmp_path / "run", steps=1) + ["model.loss_balance.image=0.5",
                                                            "model.loss_weights.reconstruction=0"]
    with pytest.raises(Med3DInsightError, match="reconstruction"):
        run_in_process(overrides, eval_cases=0)
