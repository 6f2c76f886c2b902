"""What every module of :mod:`med3dinsight_plugin.volumes` shares: :class:`VolumeError`, the one error a volume or
dataset that cannot be used raises, and :data:`NIFTI_ENDINGS`, the file endings read as NIfTI.
"""
from __future__ import annotations

from ..errors import Med3DInsightError

NIFTI_ENDINGS = (".nii.gz", ".nii")


class VolumeError(Med3DInsightError):
    """A volume or dataset that cannot be used; the message names the file and what to do."""
