"""nnU-Net v2 trainers for Med3DInsight-pretrained encoders (``nnUNetv2_train ... -tr Med3DInsightTrainer``).

Empty until the [nnunet] work lands; importable so that the package layout is stable.
"""
