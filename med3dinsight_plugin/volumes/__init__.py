"""Reading unlabeled volumes: a folder of NIfTI files, an nnU-Net raw dataset or an nnU-Net preprocessed dataset.

Every volume comes out in one *canonical* array orientation, whatever its file says: ``(C, D, H, W)`` with the axes
pointing superior, posterior and to the patient's left (LPS; the ``"zyx"`` layout of :mod:`.planes`, so axis 0 is
the axial normal, 1 the coronal, 2 the sagittal). The teacher renders slices of this array and the pretraining data
crops it, so a slice's (plane, position) means the same thing to both.

nibabel reads NIfTI and SimpleITK (an nnU-Net dependency) the other formats (:func:`read_image` says why);
nnU-Net's own helpers find a raw dataset's cases. nnU-Net's
preprocessed ``.pkl`` properties are read with an allow-listed unpickler (numpy arrays and builtins only).

The teacher sees scanner units. For an nnU-Net preprocessed dataset whose raw dataset is found (``raw=``, else
``$nnUNet_raw/<dataset_name>``), :meth:`Volume.native` is the raw image put through nnU-Net's own preprocessing
(its reader, transpose, crop to non-zero and resampling) without the normalisation, so it lies voxel for voxel on
the preprocessed grid in Hounsfield units: air, fat and bone keep their contrast, which nnU-Net's clip to the
foreground percentiles removes. Without the raw dataset it falls back to undoing the z-score (clipped values).

No voxel is read before the file's header has been checked (:func:`check_claimed_size`, every reader): a header
claiming more voxel data than the file holds (uncompressed), or than its compressed bytes can expand to (1032-fold,
deflate's limit), is refused as truncated or damaged, and so is a volume larger than ``$MED3DINSIGHT_MAX_VOLUME_GB``
gigabytes as float32 (default 8; raise it for larger real volumes), before anything is allocated.

The package holds one concept per module: :mod:`.common` (:class:`VolumeError`, ``NIFTI_ENDINGS``), :mod:`.headers`
(the claimed-size checks), :mod:`.image` (one image file: :class:`Volume`, :func:`canonical_axes`,
:func:`read_image`), :mod:`.preprocessed` (one nnU-Net preprocessed case's files), :mod:`.source`
(:class:`VolumeSource`), :mod:`.nnunet_layout` (nnU-Net raw and preprocessed datasets) and :mod:`.discovery`
(:func:`open_source`, NIfTI folders). Every name below is importable from ``med3dinsight_plugin.volumes`` as before.
"""
# __all__, and the other names of the former volumes.py that code elsewhere imports (noqa: re-exported)
from .common import NIFTI_ENDINGS, VolumeError  # noqa: F401
from .discovery import open_source
from .headers import (  # noqa: F401
    DEFAULT_MAX_VOLUME_GB,
    MAX_COMPRESSION_RATIO,
    MAX_VOLUME_ENV,
    check_claimed_size,
    check_file_size,
)
from .image import MIN_VOXELS, Volume, canonical_axes, read_image  # noqa: F401
from .preprocessed import safe_load_pickle
from .source import VolumeSource

__all__ = ["Volume", "VolumeError", "VolumeSource", "canonical_axes", "check_claimed_size", "open_source",
           "safe_load_pickle"]
