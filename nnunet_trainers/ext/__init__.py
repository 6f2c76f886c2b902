# The folder nnUNet_extTrainer points at (see `med3dinsight nnunet-env`); nnU-Net imports its modules by file.
