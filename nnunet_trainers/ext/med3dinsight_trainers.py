"""Discovery shim for nnU-Net: ``nnUNet_extTrainer`` points at this folder, nnU-Net imports this module and looks
the trainer up by class name. It only re-exports, so the classes keep their canonical, picklable home in
``nnunet_trainers.trainers``. Guarded: an import error here must not break the discovery of every other trainer.
"""
try:
    from nnunet_trainers.trainers import *  # noqa: F401,F403
except Exception as error:  # pragma: no cover - reported, never raised
    import warnings

    warnings.warn(f"med3dinsight's nnU-Net trainers could not be imported ({error!r}); reinstall med3dinsight")
