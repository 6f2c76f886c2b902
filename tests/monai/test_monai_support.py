"""MONAI integration: the handler, the fine-tuning trainer and its schedule, bundle configs, the classifier."""
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss

from helpers import tiny_backbone
from med3dinsight_plugin import IncompatibleCheckpointError, save_pretrained
from med3dinsight_plugin.monai_support import (
    FinetuneSchedule,
    Med3DInsightClassifier,
    Med3DInsightSupervisedTrainer,
    PretrainedEncoderLoader,
)


@pytest.fixture
def unetr_ckpt(tmp_path):
    backbone = tiny_backbone("unetr", seed=0)
    return backbone, save_pretrained(backbone, tmp_path / "unetr.safetensors")


def _segmentation_data(n=2, channels=1, size=32):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(channels, size, size, size, generator=g),
             "label": torch.randint(0, 2, (1, size, size, size), generator=g)} for _ in range(n)]


def _encoder(network):
    return {k: v.clone() for k, v in network.state_dict().items() if k.startswith(("vit.", "encoder"))}


def test_trainer_loads_weights_freezes_then_trains(unetr_ckpt):
    source, path = unetr_ckpt
    network = tiny_backbone("unetr", seed=1, in_channels=2).network
    snapshots = []
    trainer = Med3DInsightSupervisedTrainer(
        "cpu", max_epochs=2, train_data_loader=DataLoader(_segmentation_data(channels=2), batch_size=2),
        network=network, loss_function=DiceCELoss(to_onehot_y=True, softmax=True), checkpoint=path,
        lr=1e-3, frozen_encoder_epochs=1, warmup_epochs=1)
    assert trainer.load_report.coverage == 100.0 and trainer.load_report.adapted  # 1 -> 2 channels
    pretrained = _encoder(network)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: snapshots.append(_encoder(network)))
    trainer.run()
    (epoch1, lrs1), (epoch2, lrs2) = trainer.schedule.history
    assert lrs1[0] == 0.0 and lrs1[1] > 0 and lrs2[0] > 0  # encoder group frozen by lr 0 in epoch 1 only
    assert all(torch.equal(snapshots[0][k], pretrained[k]) for k in pretrained)  # frozen: unchanged exactly
    assert any(not torch.equal(snapshots[1][k], pretrained[k]) for k in pretrained)  # then fine-tuned


def test_trainer_refuses_a_checkpoint_for_another_network(unetr_ckpt):
    _, path = unetr_ckpt
    network = tiny_backbone("swin_unetr").network
    with pytest.raises(IncompatibleCheckpointError):
        Med3DInsightSupervisedTrainer("cpu", 1, [], network, torch.nn.MSELoss(), path)


def test_schedule_warmup_poly_and_frozen_encoder():
    from med3dinsight_plugin.finetune import finetune_lr_factor

    # 16 steps, 4 of warm-up: 1/4 .. 4/4, then poly from the peak over the remaining 12
    assert [finetune_lr_factor(i, 16, 4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert finetune_lr_factor(4, 16, 4) == 1.0 and finetune_lr_factor(10, 16, 4) == pytest.approx(0.5 ** 0.9)
    assert finetune_lr_factor(15, 16, 4) == pytest.approx((1 / 12) ** 0.9)
    # frozen encoder: 0 for 4 steps, then its own warm-up; other groups are unaffected
    assert [finetune_lr_factor(i, 16, 4, frozen=4, encoder=True) for i in (0, 3, 4, 7)] == [0.0, 0.0, 0.25, 1.0]
    assert finetune_lr_factor(3, 16, 4, frozen=4, encoder=False) == 1.0
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0, "encoder": True}], lr=1.0)
    schedule = FinetuneSchedule(opt, warmup_epochs=1, frozen_encoder_epochs=1)
    assert schedule.factor(3, epoch_length=4, max_epochs=4, encoder=True) == 0.0
    assert schedule.factor(4, epoch_length=4, max_epochs=4, encoder=True) == 0.25


def test_handler_in_a_plain_supervised_trainer_and_from_a_bundle_config(unetr_ckpt):
    from monai.bundle import ConfigParser

    source, path = unetr_ckpt
    network = tiny_backbone("unetr", seed=1).network
    loader = ConfigParser({
        "network": network,
        "loader": {"_target_": "med3dinsight_plugin.monai_support.PretrainedEncoderLoader",
                   "checkpoint": str(path), "network": "@network"},
    }).get_parsed_content("loader")
    assert isinstance(loader, PretrainedEncoderLoader)
    trainer = SupervisedTrainer("cpu", 1, DataLoader(_segmentation_data(), batch_size=1), network,
                                torch.optim.SGD(network.parameters(), lr=0.0), DiceCELoss(to_onehot_y=True,
                                                                                          softmax=True),
                                epoch_length=2, train_handlers=[loader])
    assert loader.report is None
    trainer.run()
    assert loader.report.applied and loader.report.coverage == 100.0
    assert all(torch.equal(v, source.network.state_dict()[k]) for k, v in _encoder(network).items())
    bad = PretrainedEncoderLoader(path, tiny_backbone("plain_conv_unet").network)
    engine = Engine(lambda e, b: None)
    bad.attach(engine)
    with pytest.raises(IncompatibleCheckpointError):
        engine.run([0])


@pytest.mark.parametrize("name,pooling", [("unetr", "avg"), ("resenc_unet", "attention"), ("swin_unetr", "max")])
def test_classifier_from_pretrained(tmp_path, name, pooling):
    path = save_pretrained(tiny_backbone(name), tmp_path / "c.safetensors")
    model = Med3DInsightClassifier.from_pretrained(path, num_classes=3, pooling=pooling, in_channels=2)
    assert model.load_report.coverage == 100.0
    x = torch.randn(2, 2, *model.backbone.patch_size)
    logits = model(x)
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("head.") for n in trainable)
    assert all(n.startswith(("head.", "query", "attention.")) or
               n[len("backbone.network."):].startswith(model.backbone.bottleneck_prefixes) for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_fractional_warmup_never_exceeds_the_peak():
    from med3dinsight_plugin.finetune import finetune_lr_factor

    for total, warmup in ((15, 1.5), (6, 0.6), (40, 3.3)):
        factors = [finetune_lr_factor(i, total, warmup) for i in range(total)]
        assert max(factors) == 1.0 and all(0 <= f <= 1 for f in factors)
