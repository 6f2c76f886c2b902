"""Backbone families: every registered family is checked by every consumer of its descriptor, and a new family is
its own module plus one registration (shown with a dummy family defined here)."""
import pydoc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TINY_BACKBONES
from med3dinsight_plugin import build_backbone, list_backbones, load_pretrained_encoder, save_pretrained
from med3dinsight_plugin.backbones import (
    Backbone,
    BackboneFamily,
    backbone_family,
    family_of_network,
    list_families,
    network_of_backbone,
    network_spec,
    register_backbone,
    registry,
)
from med3dinsight_plugin.checkpoint import load_checkpoint
from med3dinsight_plugin.downstream import build_downstream_network
from med3dinsight_plugin.export import ExportError, export_checkpoint

FAMILIES = [f.name for f in list_families()]


# ------------------------------------------------------------------------------------------ the registry itself

def test_every_builder_belongs_to_one_family_and_has_a_tiny_configuration():
    names = [name for f in list_families() for name in f.builders]
    assert sorted(names) == list_backbones() and len(set(names)) == len(names)
    for f in list_families():
        assert f.tiny, f"family {f.name} has no tiny configuration: the parametrised tests would skip it"
        assert all(backbone_family(name) is f for name in f.builders)
    assert set(TINY_BACKBONES) == {name for f in list_families() for name in f.tiny}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_is_known_to_every_consumer(name, tmp_path):
    """Builder, network spec, downstream network, loader, exports and the nnU-Net contract: all from the descriptor."""
    from nnunet_trainers import trainers
    from nnunet_trainers.contract import MONAI_NETWORKS, TRAINER_OF, family_of_architecture

    fam = backbone_family(name)
    builder = next(iter(fam.tiny))
    torch.manual_seed(0)
    backbone = build_backbone(builder, **fam.tiny[builder])
    assert isinstance(backbone, fam.backbone_class) and family_of_network(backbone.network) is fam
    keys = list(backbone.network.state_dict())
    spec = network_spec(backbone.network)
    assert spec.head_prefixes == fam.head_prefixes and any(k.startswith(fam.head_prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in spec.encoder_prefixes)
    if spec.key_to_lpe:  # the descriptor's position-embedding grid is the network's
        tokens = backbone.network.state_dict()[spec.key_to_lpe].shape[1]
        assert torch.Size(fam.position_grid(backbone.patch_size)).numel() == tokens

    # the step-0 check, export and attach all load into build_downstream_network
    ckpt = save_pretrained(backbone, tmp_path / "c.safetensors")
    downstream = build_downstream_network(ckpt)
    assert family_of_network(downstream) is fam
    assert load_pretrained_encoder(downstream, ckpt).coverage == 100.0

    # nnU-Net: the trainer exists and trains the classes the plans name; adapted plans build a loadable network
    assert TRAINER_OF[name] == fam.nnunet_trainer and fam.nnunet_trainer in trainers.__all__
    for path in fam.nnunet_networks:
        cls = pydoc.locate(path)
        assert cls is not None and family_of_architecture(path) is fam, path
        assert set(getattr(trainers, fam.nnunet_trainer).architectures) >= set(fam.nnunet_network_names)
    architecture, patch = fam.plans_architecture(backbone.config, [40, 56, 72])
    assert architecture["network_class_name"] in fam.nnunet_networks
    plans = {"plans_name": "p", "configurations": {"3d_fullres": {"patch_size": patch, "architecture": architecture}}}
    assert load_pretrained_encoder(build_downstream_network(ckpt, plans, in_channels=2), ckpt).coverage == 100.0

    # exports: nnU-Net / nnssl files for the plans-native family, MONAI state dicts for the wrapped ones
    assert (name in MONAI_NETWORKS) == (not fam.plans_native)
    works, refused = (("nnssl", "monai") if fam.plans_native else ("monai", "nnssl"))
    export_checkpoint(ckpt, works, tmp_path / "ok.pth")
    with pytest.raises(ExportError, match=fam.nnunet_trainer if not fam.plans_native else "--to nnunet or --to nnssl"):
        export_checkpoint(ckpt, refused, tmp_path / "refused.pth")


# ------------------------------------------------------------------------------------- a new family, end to end
# Everything below the line is what a new family's own module holds; the fixture's register_backbone is the one
# registration (in the package: one line in backbones/__init__.py).

class TinyNet(nn.Module):
    """A plain encoder-decoder with a segmentation head, in MONAI's (in_channels, out_channels) convention."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, width: int = 4):
        super().__init__()
        self.encoder = nn.Conv3d(in_channels, width, 3, stride=2, padding=1)
        self.decoder = nn.ConvTranspose3d(width, width, 2, stride=2)
        self.out = nn.Conv3d(width, out_channels, 1)

    def forward(self, x):
        return self.out(self.decoder(F.relu(self.encoder(x))))


class TinyNetBackbone(Backbone):
    network_classes = ("TinyNet",)
    encoder_prefixes = bottleneck_prefixes = ("encoder.",)
    head_prefixes = ("out.",)
    key_to_encoder = key_to_stem = "encoder"
    keys_to_in_proj = ("encoder",)

    def spatial_divisor(self):
        return (2, 2, 2)

    def features(self, x):
        bottleneck = F.relu(self.network.encoder(x))
        return bottleneck, self.network.decoder(bottleneck)


def build_tiny_net(in_channels=1, patch_size=None, **network_kwargs):
    kwargs = {"out_channels": 2, "width": 4, **network_kwargs}
    patch = tuple(patch_size or (16, 16, 16))
    return TinyNetBackbone(TinyNet(in_channels, **kwargs), in_channels, patch, token_dim=kwargs["width"],
                           decoder_dim=kwargs["width"], config=dict(name="tiny_net", in_channels=in_channels,
                                                                    patch_size=list(patch), network_kwargs=kwargs))


TINY_NET = BackboneFamily(
    name="tiny_net", backbone_class=TinyNetBackbone, builders={"tiny_net": build_tiny_net},
    build_network=network_of_backbone, nnunet_trainer="Med3DInsightTrainer_TinyNet",
    nnunet_networks=("nnunet_trainers.networks.TinyNetForNNUNet",), wrapped_network=f"{__name__}.TinyNet",
    patch_multiple=(2, 8), tiny={"tiny_net": dict(patch_size=(16, 16, 16))})


@pytest.fixture
def tiny_net_registered(monkeypatch):
    from nnunet_trainers import networks, trainers

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))  # the registry is restored afterwards
    register_backbone(TINY_NET)
    yield TINY_NET
    for module in (networks, trainers):  # classes made on first access for the family
        for name in [n for n in vars(module) if "TinyNet" in n]:
            monkeypatch.delitem(vars(module), name)


def test_a_new_family_is_its_own_module_plus_one_registration(tiny_net_registered, tmp_path):
    from nnunet_trainers import trainers
    from nnunet_trainers.attach import _adapt
    from nnunet_trainers.contract import MONAI_NETWORKS, TRAINER_OF, checkpoint_family

    assert "tiny_net" in list_backbones()
    backbone = build_backbone("tiny_net")
    x = torch.randn(1, 1, 16, 16, 16)
    tokens, reconstruction = backbone(x)
    assert tokens.shape == (1, 512, 4) and reconstruction.shape == x.shape
    assert backbone.unused_in_pretraining() == ("out.weight", "out.bias")

    # the one loader, the step-0 check's downstream network, and the exports know it
    ckpt = save_pretrained(backbone, tmp_path / "tiny.safetensors")
    downstream = build_downstream_network(ckpt, in_channels=3)  # channel adaptation 1 -> 3
    report = load_pretrained_encoder(downstream, ckpt)
    assert report.coverage == 100.0 and list(report.adapted) == ["encoder.weight"]
    export_checkpoint(ckpt, "monai", tmp_path / "tiny.pt")
    assert set(torch.load(tmp_path / "tiny.pt", weights_only=True)) == {"encoder.weight", "encoder.bias",
                                                                        "decoder.weight", "decoder.bias"}
    with pytest.raises(ExportError, match="-tr Med3DInsightTrainer_TinyNet"):
        export_checkpoint(ckpt, "nnunet", tmp_path / "tiny.pth")

    # the nnU-Net contract, nnunet-attach's adapted plans, the network class they name and the trainer
    assert TRAINER_OF["tiny_net"] == "Med3DInsightTrainer_TinyNet" and "tiny_net" in MONAI_NETWORKS
    assert checkpoint_family("med3dinsight", load_checkpoint(ckpt).metadata) is TINY_NET
    config = {"patch_size": [20, 28, 31], "architecture": {"network_class_name": "PlainConvUNet"}}
    meta = load_checkpoint(ckpt).metadata
    changes = _adapt(config, "3d_fullres", TINY_NET, meta, {"configurations": {"3d_fullres": config}})
    assert changes == ["architecture PlainConvUNet -> TinyNetForNNUNet", "patch size [20, 28, 31] -> [20, 28, 32]"]
    plans = {"plans_name": "p", "configurations": {"3d_fullres": config}}
    network = build_downstream_network(ckpt, plans, in_channels=1, num_classes=5)
    assert type(network).__name__ == "TinyNetForNNUNet" and network.out.out_channels == 5
    assert load_pretrained_encoder(network, ckpt).coverage == 100.0
    trainer = trainers.Med3DInsightTrainer_TinyNet_smoke
    assert trainer.architectures == ("TinyNetForNNUNet",) and trainer.optimizer_name == "adamw"
    assert issubclass(trainer, trainers.Med3DInsightTrainer_TinyNet)


def test_registration_refuses_a_taken_name():
    with pytest.raises(ValueError, match="'unetr' is already registered"):
        register_backbone(BackboneFamily(
            name="unetr", backbone_class=TinyNetBackbone, builders={"unetr": build_tiny_net},
            build_network=network_of_backbone, nnunet_trainer="X", nnunet_networks=("a.B",), wrapped_network="a.C",
            patch_multiple=(2, 2)))


def test_the_built_in_trainers_are_written_out_and_match_the_family_descriptors():
    """``grep "class Med3DInsightTrainer_UNETR_smoke"`` finds the trainer a user passes to -tr: every trainer of a
    built-in family is a literal class in nnunet_trainers/trainers.py, and nothing else there is generated."""
    import ast

    import nnunet_trainers.trainers as trainers
    from med3dinsight_plugin.backbones import list_families

    tree = ast.parse(Path(trainers.__file__).read_text())
    written = {node.name for node in tree.body if isinstance(node, ast.ClassDef)
               and node.name.startswith("Med3DInsightTrainer")}
    built_in = set(trainers.__all__) - {"nnUNetTrainer_med3dinsightStudy"}  # the families known at its import
    assert written == built_in and len(built_in) == 18
    for fam in list_families():
        names = trainers.define_family_trainers(fam)
        if fam.nnunet_trainer not in built_in:
            continue  # a family a test registered later: generated, as a plug-in's is
        assert set(names) <= written, fam.name
        base = getattr(trainers, fam.nnunet_trainer)
        assert set(fam.nnunet_network_names) <= set(base.architectures), fam.name
        for name in names[1:]:
            assert issubclass(getattr(trainers, name), base) and getattr(trainers, name).__doc__, name
