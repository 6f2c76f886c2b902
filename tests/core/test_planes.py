"""The plane / position convention shared by PSAT, the teacher and the data pipeline."""
import numpy as np
import pytest

from med3dinsight_plugin.planes import PLANES, crop_position, normal_axis, plane_id, slice_index, slice_position


def test_plane_ids_and_names():
    assert PLANES == ("axial", "coronal", "sagittal")
    assert [plane_id(p) for p in ("axial", "Coronal", "SAGITTAL", 0, 1, 2)] == [0, 1, 2, 0, 1, 2]
    for bad in ("transverse", 3, -1, True, 1.0):
        with pytest.raises(ValueError):
            plane_id(bad)


def test_normal_axes_for_nnunet_and_ras_arrays():
    assert [normal_axis(p, "zyx") for p in range(3)] == [0, 1, 2]
    assert [normal_axis(p, "xyz") for p in range(3)] == [2, 1, 0]
    with pytest.raises(ValueError, match="unknown array layout"):
        normal_axis(0, "yxz")


def test_normal_axis_selects_the_plane_of_a_marked_volume():
    """An axial slice of a (z, y, x) array is array[z]: a marker at one z appears in exactly one axial slice."""
    volume = np.zeros((5, 6, 7))
    volume[3, 2, 4] = 1
    for plane, index in ((0, 3), (1, 2), (2, 4)):
        axis = normal_axis(plane, "zyx")
        hits = [i for i in range(volume.shape[axis]) if np.take(volume, i, axis=axis).any()]
        assert hits == [index]


def test_positions_are_voxel_centres_and_round_trip():
    assert slice_position(0, 4) == 0.125 and slice_position(3, 4) == 0.875
    for size in (1, 7, 128, 301):
        assert [slice_index(slice_position(i, size), size) for i in range(size)] == list(range(size))
    assert slice_index(0.0, 10) == 0 and slice_index(1.0, 10) == 9
    with pytest.raises(ValueError):
        slice_position(4, 4)
    with pytest.raises(ValueError):
        slice_index(1.5, 4)


def test_crop_position_maps_volume_slices_into_the_crop():
    # volume slice 40 in the crop [32, 96) is crop slice 8 of 64
    assert crop_position(40, 32, 64) == slice_position(8, 64)
    assert crop_position(32, 32, 64) == 0.5 / 64
    with pytest.raises(ValueError):
        crop_position(96, 32, 64)  # outside the crop
