"""nnU-Net v2 trainers that start from a Med3DInsight-pretrained encoder.

``nnUNetv2_train DATASET 3d_fullres FOLD -p PLANS -tr Med3DInsightTrainer`` with PyPI's unmodified nnunetv2, once
``nnUNet_extTrainer`` points at this package's shim (``eval "$(med3dinsight nnunet-env)"``).

* Which weights: the plans' ``"med3dinsight"`` entry written by ``med3dinsight nnunet-attach``, or
  ``$MED3DINSIGHT_CHECKPOINT``; either a path or ``hf-hub:ORG/REPO[@REVISION]`` (read through huggingface_hub's cache,
  offline with ``HF_HUB_OFFLINE=1``). None configured: the run stops with a message (never a silent scratch run).
* When: inside ``initialize()``, after the network is built and before its first (compiled) forward pass and the DDP
  wrap -- in ``configure_optimizers``, which nnU-Net calls between the two -- through the package's one loader. The
  load report goes to nnU-Net's training log and ``pretrained_load_report.json``; a mismatch stops the run before
  epoch 0 with exit code 2.
* How it trains (nnssl's recipe): CNNs SGD lr 1e-3; transformers AdamW lr 1e-4, weight decay 5e-2; linear warm-up
  (50 of 1000 epochs, 10 % of shorter schedules) then poly decay; optional frozen-encoder start; learning rates logged
  every epoch. AMP, ``-num_gpus`` DDP, torch.compile and ``-device cpu`` are nnU-Net's own, untouched.

Variants override one hook, :meth:`Med3DInsightTrainer.configure_run`. The constructor keeps nnU-Net's signature.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from med3dinsight_plugin.backbones import list_families
from med3dinsight_plugin.checkpoint import resolve_checkpoint
from med3dinsight_plugin.errors import Med3DInsightError, first_line
from med3dinsight_plugin.fileio import atomic_write, sha256_file
from med3dinsight_plugin.finetune import (
    apply_finetune_lr,
    default_warmup,
    finetune_optimizer,
    finetune_param_groups,
    freeze_dead_parameters,
)
from med3dinsight_plugin.loading import load_pretrained_encoder

from .contract import PLANS_KEY, configured_checkpoint, family_of_architecture


class FinetuneLRScheduler:
    """nnU-Net-style epoch scheduler (``step(epoch)``) over :func:`apply_finetune_lr`."""

    def __init__(self, optimizer, num_epochs: int, warmup_epochs: int, frozen_encoder_epochs: int = 0):
        self.optimizer, self.num_epochs = optimizer, num_epochs
        self.warmup_epochs, self.frozen = warmup_epochs, frozen_encoder_epochs

    def step(self, current_step: int = 0) -> None:
        apply_finetune_lr(self.optimizer, current_step, self.num_epochs, self.warmup_epochs, self.frozen)


class Med3DInsightTrainer(nnUNetTrainer):
    """Fine-tunes the plans' PlainConvUNet / ResidualEncoderUNet from a pretrained encoder (SGD, lr 1e-3)."""

    architectures = ()  # what this trainer trains (network class names): its family's, set below
    optimizer_name = "sgd"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.warmup_epochs = None  # None: 50 for 1000 epochs, else 10 % of the epochs
        self.frozen_encoder_epochs = 0
        self._resuming = False
        self.configure_run()
        self._check_architecture()

    def configure_run(self) -> None:
        """Hook for variants: set ``num_epochs``, ``warmup_epochs``, ``frozen_encoder_epochs``, ``initial_lr``..."""

    # ---------------------------------------------------------------------------------------------- weights

    def configure_optimizers(self):
        # nnU-Net calls this inside initialize(), after building (and lazily compiling) the network and before the
        # DDP wrap: load here, so no forward pass has run and every rank holds the same weights before DDP.
        if self._resuming:
            self.print_to_log_file("A training checkpoint is being loaded (--c / --val): its weights replace the "
                                   "pretrained ones, which are not read")
        else:
            self.load_pretrained_checkpoint()
        freeze_dead_parameters(self.network)  # unused parameters would stall DDP's gradient reduction
        groups = finetune_param_groups(self.network, self.initial_lr)
        optimizer = finetune_optimizer(groups, self.optimizer_name, self.initial_lr, self.weight_decay)
        warmup = self.warmup_epochs if self.warmup_epochs is not None else default_warmup(self.num_epochs)
        self.print_to_log_file(f"Med3DInsight fine-tuning: {self.optimizer_name}, peak lr {self.initial_lr}, "
                               f"weight decay {self.weight_decay}, {warmup} warm-up epochs, "
                               f"{self.frozen_encoder_epochs} frozen-encoder epochs, {self.num_epochs} epochs")
        return optimizer, FinetuneLRScheduler(optimizer, self.num_epochs, warmup, self.frozen_encoder_epochs)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self._resuming = True  # nnU-Net initialises inside; the training checkpoint's weights win
        super().load_checkpoint(filename_or_checkpoint)

    def load_pretrained_checkpoint(self):
        """Load the configured checkpoint into ``self.network``; stop the run with exit code 2 if impossible."""
        plans = self.plans_manager.plans
        try:
            path, origin = configured_checkpoint(plans)
        except Med3DInsightError as e:
            self._stop(first_line(e))
        if not path:
            self._stop(f"{type(self).__name__} has no pretrained checkpoint: the plans '{plans.get('plans_name')}' "
                       f"carry none and $MED3DINSIGHT_CHECKPOINT is unset. Run `med3dinsight nnunet-attach -d "
                       f"DATASET -p {plans.get('plans_name')} -c CHECKPOINT` and train with the plans it writes (-p), "
                       f"or set MED3DINSIGHT_CHECKPOINT; to train from scratch use -tr nnUNetTrainer")
        entry = plans.get(PLANS_KEY) if origin.startswith("plans") else {}
        try:
            local = resolve_checkpoint(path)  # a file, or hf-hub:ORG/REPO[@REVISION] from the Hugging Face cache
            if entry.get("sha256") and origin.startswith("plans") and sha256_file(local) != entry["sha256"]:
                self.print_to_log_file(f"WARNING: {path} changed since it was attached to these plans")
            report = load_pretrained_encoder(self.network, local, strict_encoder=True)
        except (Med3DInsightError, OSError) as e:  # a user error; anything else is a bug and keeps its traceback
            details = getattr(e, "report", None)
            self._stop(f"pretrained checkpoint from {origin}: {first_line(e)}", details)
        self.print_to_log_file(f"Pretrained weights from {origin}:\n{report}", add_timestamp=False)
        if self.local_rank == 0:
            atomic_write(Path(self.output_folder) / "pretrained_load_report.json",
                          lambda tmp: Path(tmp).write_text(json.dumps(report.to_dict(), indent=2)))
        self.pretrained_load_report = report

    def _stop(self, message: str, details=None) -> None:
        """One clear message in the training log and on stderr, then exit code 2 (before any epoch)."""
        self.print_to_log_file(f"ERROR: {message}" + (f"\n{details}" if details else ""), also_print_to_console=False)
        if self.local_rank == 0:
            print(f"med3dinsight: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def _check_architecture(self) -> None:
        name = self.configuration_manager.network_arch_class_name.rsplit(".", 1)[-1]
        if name not in self.architectures:
            right = family_of_architecture(name)
            fix = (f"use -tr {right.nnunet_trainer}" if right and not right.plans_native else
                   "attach a checkpoint with `med3dinsight nnunet-attach ... --adapt-architecture`")
            self._stop(f"{type(self).__name__} trains {'/'.join(self.architectures)} but configuration "
                       f"'{self.configuration_name}' of the plans builds {name}; {fix}")

    # ---------------------------------------------------------------------------------------------- logging

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        rates = ", ".join(f"{'encoder' if g.get('encoder') else 'new layers'} {g['lr']:.3g}"
                          for g in self.optimizer.param_groups)
        self.print_to_log_file(f"Learning rates: {rates}")


class _MonaiTrainerMixin:
    """MONAI transformers: AdamW 1e-4 / weight decay 5e-2 (nnssl's Primus recipe), no deep supervision."""

    optimizer_name = "adamw"

    def configure_run(self) -> None:
        super().configure_run()
        self.initial_lr, self.weight_decay = 1e-4, 5e-2
        self.enable_deep_supervision = False

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # MONAI networks have a single output


# Schedule variants, one hook each. Names say what changes, as nnU-Net's nnUNetTrainer_250epochs does.

class _Epochs100:
    def configure_run(self):
        super().configure_run()
        self.num_epochs = 100


class _Epochs250:
    def configure_run(self):
        super().configure_run()
        self.num_epochs = 250


class _FrozenEncoder:
    """The encoder stays at learning rate 0 while the new layers warm up, then gets its own warm-up."""

    def configure_run(self):
        super().configure_run()
        self.frozen_encoder_epochs = 50


class _Smoke:
    """1 epoch of 2 training and 1 validation iterations: a first try of the whole pipeline, and for tests."""

    def configure_run(self):
        super().configure_run()
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1


# ``med3dinsight study`` (nnunet_trainers/study.py): the plans' "med3dinsight_study" entry fixes the training subset,
# the held-out cases, the schedule and the seed. Scratch runs use the same trainer and plans without a checkpoint, so
# the initial weights are the only difference between the initialisations compared.

STUDY_KEY = "med3dinsight_study"


def _study_entry(trainer) -> dict:
    entry = trainer.plans_manager.plans.get(STUDY_KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("train_cases"), list):
        raise SystemExit(f"med3dinsight: error: {type(trainer).__name__} trains only with plans written by "
                         f"`med3dinsight study` (a '{STUDY_KEY}' entry); use -tr Med3DInsightTrainer otherwise")
    return entry


def _apply_study(trainer) -> None:
    """Schedule and seed from the plans' study entry (called at the end of ``__init__``, before the network is
    built, so that a seed gives every initialisation the same random decoder and augmentation stream)."""
    import random

    import numpy as np

    entry = _study_entry(trainer)
    if entry.get("num_epochs"):
        trainer.num_epochs = int(entry["num_epochs"])
    if entry.get("iterations"):
        trainer.num_iterations_per_epoch = int(entry["iterations"])
    if entry.get("val_iterations"):
        trainer.num_val_iterations_per_epoch = int(entry["val_iterations"])
    seed = int(entry.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _study_split(trainer):
    entry = _study_entry(trainer)
    train, held_out = list(entry["train_cases"]), list(entry["val_cases"])
    trainer.print_to_log_file(f"med3dinsight study: init {entry.get('init')}, {len(train)} training cases "
                              f"(seed {entry.get('seed')}), {len(held_out)} held-out cases of fold {trainer.fold}")
    return train, held_out


class _Study:
    """Subset, held-out cases, schedule and seed from the plans (``med3dinsight study``); no checkpoint = scratch."""

    def configure_run(self):
        super().configure_run()
        _apply_study(self)

    def do_split(self):
        return _study_split(self)

    def load_pretrained_checkpoint(self):
        if _study_entry(self).get("checkpoint") is None:
            self.print_to_log_file("med3dinsight study: scratch (random initial weights, same recipe)")
            self.pretrained_load_report = None
            return
        super().load_pretrained_checkpoint()


class nnUNetTrainer_med3dinsightStudy(nnUNetTrainer):
    """nnU-Net's default recipe, only with the study's subset, held-out cases, schedule and seed (the reference)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_study(self)

    def do_split(self):
        return _study_split(self)


# The built-in trainers, written out so that a ``-tr NAME`` can be found with grep. nnU-Net finds trainers by class
# name in this module (through the ext/ shim). Med3DInsightTrainer trains the plans-native family (nnU-Net's CNNs);
# a family whose network nnU-Net builds through nnunet_trainers.networks (the MONAI transformers) trains with
# ``<its trainer>(_MonaiTrainerMixin, Med3DInsightTrainer)``. Each has the variants _100epochs, _250epochs,
# _frozenEncoder, _smoke and _study (one hook each). A backbone family registered by a plug-in gets the same set,
# defined by define_family_trainers below; tests/core/test_families.py checks that the classes written
# here are exactly the set the built-in families' descriptors ask for.

class Med3DInsightTrainer_100epochs(_Epochs100, Med3DInsightTrainer):
    """Med3DInsightTrainer for 100 epochs."""


class Med3DInsightTrainer_250epochs(_Epochs250, Med3DInsightTrainer):
    """Med3DInsightTrainer for 250 epochs."""


class Med3DInsightTrainer_frozenEncoder(_FrozenEncoder, Med3DInsightTrainer):
    """Med3DInsightTrainer with the encoder frozen for the first 50 epochs, then warmed up."""


class Med3DInsightTrainer_smoke(_Smoke, Med3DInsightTrainer):
    """Med3DInsightTrainer for 1 epoch of 2 training and 1 validation iterations (a first try, tests)."""


class Med3DInsightTrainer_study(_Study, Med3DInsightTrainer):
    """Med3DInsightTrainer on `med3dinsight study`'s subset, held-out cases, schedule and seed."""


class Med3DInsightTrainer_SwinUNETR(_MonaiTrainerMixin, Med3DInsightTrainer):
    """Fine-tunes a MONAI SwinUNETR described in the plans (``nnunet-attach --adapt-architecture``)."""


class Med3DInsightTrainer_SwinUNETR_100epochs(_Epochs100, Med3DInsightTrainer_SwinUNETR):
    """Med3DInsightTrainer_SwinUNETR for 100 epochs."""


class Med3DInsightTrainer_SwinUNETR_250epochs(_Epochs250, Med3DInsightTrainer_SwinUNETR):
    """Med3DInsightTrainer_SwinUNETR for 250 epochs."""


class Med3DInsightTrainer_SwinUNETR_frozenEncoder(_FrozenEncoder, Med3DInsightTrainer_SwinUNETR):
    """Med3DInsightTrainer_SwinUNETR with the encoder frozen for the first 50 epochs, then warmed up."""


class Med3DInsightTrainer_SwinUNETR_smoke(_Smoke, Med3DInsightTrainer_SwinUNETR):
    """Med3DInsightTrainer_SwinUNETR for 1 epoch of 2 training and 1 validation iterations (a first try, tests)."""


class Med3DInsightTrainer_SwinUNETR_study(_Study, Med3DInsightTrainer_SwinUNETR):
    """Med3DInsightTrainer_SwinUNETR on `med3dinsight study`'s subset, held-out cases, schedule and seed."""


class Med3DInsightTrainer_UNETR(_MonaiTrainerMixin, Med3DInsightTrainer):
    """Fine-tunes a MONAI UNETR described in the plans (``nnunet-attach --adapt-architecture``)."""


class Med3DInsightTrainer_UNETR_100epochs(_Epochs100, Med3DInsightTrainer_UNETR):
    """Med3DInsightTrainer_UNETR for 100 epochs."""


class Med3DInsightTrainer_UNETR_250epochs(_Epochs250, Med3DInsightTrainer_UNETR):
    """Med3DInsightTrainer_UNETR for 250 epochs."""


class Med3DInsightTrainer_UNETR_frozenEncoder(_FrozenEncoder, Med3DInsightTrainer_UNETR):
    """Med3DInsightTrainer_UNETR with the encoder frozen for the first 50 epochs, then warmed up."""


class Med3DInsightTrainer_UNETR_smoke(_Smoke, Med3DInsightTrainer_UNETR):
    """Med3DInsightTrainer_UNETR for 1 epoch of 2 training and 1 validation iterations (a first try, tests)."""


class Med3DInsightTrainer_UNETR_study(_Study, Med3DInsightTrainer_UNETR):
    """Med3DInsightTrainer_UNETR on `med3dinsight study`'s subset, held-out cases, schedule and seed."""


_VARIANTS = (("100epochs", _Epochs100), ("250epochs", _Epochs250), ("frozenEncoder", _FrozenEncoder),
             ("smoke", _Smoke), ("study", _Study))


def define_family_trainers(family) -> list:
    """Define ``family.nnunet_trainer`` and its variants in this module, unless they exist.

    Args:
        family: a :class:`~med3dinsight_plugin.backbones.BackboneFamily`.

    Returns:
        The names of the trainers of the family.
    """
    base = globals().get(family.nnunet_trainer)
    if base is None:
        if family.plans_native:
            raise Med3DInsightError(f"backbone family {family.name!r}: nnunet_trainer {family.nnunet_trainer!r} "
                                    f"must be Med3DInsightTrainer (plans-native families train with it)")
        base = type(family.nnunet_trainer, (_MonaiTrainerMixin, Med3DInsightTrainer), {
            "__module__": __name__,
            "__doc__": f"Fine-tunes a {family.network_classes[0]} described in the plans (``nnunet-attach "
                       f"--adapt-architecture``)."})
        globals()[base.__name__] = base
    if base is Med3DInsightTrainer:  # several plans-native families may share it
        base.architectures = tuple(dict.fromkeys(base.architectures + family.nnunet_network_names))
    else:  # what a family trains is its descriptor's, also for the classes written out above
        base.architectures = tuple(family.nnunet_network_names)
    names = [base.__name__]
    for suffix, variant in _VARIANTS:
        name = f"{base.__name__}_{suffix}"
        if name not in globals():
            globals()[name] = type(name, (variant, base), {"__module__": __name__, "__doc__": variant.__doc__})
        names.append(name)
    return names


__all__ = [name for family in list_families() for name in define_family_trainers(family)] + \
    ["nnUNetTrainer_med3dinsightStudy"]


def __getattr__(name: str):
    """The trainers of a family registered after this module was imported, defined on first access."""
    for family in list_families():
        if name.startswith(family.nnunet_trainer) and name in define_family_trainers(family):
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
