"""nnU-Net v2 trainers for Med3DInsight-pretrained encoders.

``eval "$(med3dinsight nnunet-env)"`` makes nnU-Net find them (through ``nnUNet_extTrainer`` and the ``ext/`` shim);
then ``nnUNetv2_train DATASET 3d_fullres FOLD -p PLANS -tr Med3DInsightTrainer``. Modules:

* ``trainers``: Med3DInsightTrainer (PlainConvUNet / ResEncUNet), _SwinUNETR, _UNETR and their schedule variants.
* ``attach``: ``med3dinsight nnunet-attach`` -- plans that carry a checkpoint (and, if asked, its architecture).
* ``networks``: MONAI networks with nnU-Net's constructor, named by plans.
* ``ext/``: the discovery shim (re-exports only).

Importing this package imports nothing heavy; ``trainers`` imports nnU-Net.
"""
