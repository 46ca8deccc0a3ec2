"""The canonical profile makes the mask independent of how the same CT is stored on disk.

The reference CT (stored RAS+) is re-saved with flipped and permuted voxel axes by SimpleITK (same anatomy, same
world geometry), segmented with the same world-space prompts, and the masks are compared in world space after
SimpleITK resamples them back onto the original grid (voxel centres coincide, so nearest-neighbour is exact).
The fixture's tiny checkpoint is used because its decoder has a spatial prior: in `official` mode the stored
voxel order changes its result, which makes the test able to fail.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medsegx_core.data.readers import read_volume
from medsegx_core.data.orientation import AxisReorientation
from medsegx_core.predictor import Predictor
from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts

STORAGES = {
    "flip_i": lambda image: sitk.Flip(image, [True, False, False]),
    "permute_kij_flip_j": lambda image: sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [False, True, False]),
}


@pytest.fixture(scope="module")
def original_path(reference_ct):
    return reference_ct


@pytest.fixture(scope="module")
def prompts(original_path):
    volume = read_volume(original_path)
    liver_click, corner_a, corner_b = volume.ijk_to_ras_points(np.array(
        [[70.0, 55.0, 90.0], [37.0, 25.0, 69.0], [104.0, 86.0, 111.0]]))
    return Prompts(text="liver", points=(PointPrompt(tuple(liver_click)),),
                   box=BoxPrompt(tuple(corner_a), tuple(corner_b)))


def segment_file(model, path, prompts, preprocessing):
    volume = read_volume(path)
    predictor = Predictor(model, device="cpu", precision="fp32", preprocessing=preprocessing)
    predictor.set_volume(volume)
    return volume, predictor.segment(prompts, return_logits=True)


def to_original_grid(mask: np.ndarray, stored_path, original_path) -> np.ndarray:
    stored = sitk.ReadImage(str(stored_path))
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(stored)
    resampled = sitk.Resample(image, sitk.ReadImage(str(original_path)), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)


@pytest.fixture(scope="module")
def original_result(model, original_path, prompts):
    return segment_file(model, original_path, prompts, "canonical")[1]


def test_reference_ct_is_stored_ras(original_path):
    volume = read_volume(original_path)
    assert AxisReorientation.to_ras(volume.direction_ras, volume.shape_ijk).is_identity


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_same_world_mask_however_the_ct_is_stored(storage, model, original_path, prompts, original_result,
                                                  tmp_path):
    stored_path = tmp_path / f"{storage}.nii.gz"
    sitk.WriteImage(STORAGES[storage](sitk.ReadImage(str(original_path))), str(stored_path))
    volume, result = segment_file(model, stored_path, prompts, "canonical")
    assert volume.array.shape != original_result.mask.shape or storage == "flip_i"
    assert 0 < int(original_result.mask.sum()) < original_result.mask.size
    back = to_original_grid(result.mask, stored_path, original_path)
    np.testing.assert_array_equal(back, original_result.mask)

    # Discriminative: the official profile, which keeps the stored voxel order, gives another world mask.
    _, official = segment_file(model, stored_path, prompts, "official")
    assert np.count_nonzero(to_original_grid(official.mask, stored_path, original_path)
                            != original_result.mask) > 1000


def test_official_and_canonical_agree_on_a_ras_volume(model, original_path, prompts, original_result):
    _, official = segment_file(model, original_path, prompts, "official")
    np.testing.assert_array_equal(official.mask, original_result.mask)
    np.testing.assert_array_equal(official.logits, original_result.logits)


@pytest.mark.parametrize("direction", [
    np.diag([-1.0, 1.0, 1.0]),
    np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    np.array([[0.0, 0.7, 0.71], [0.0, -0.71, 0.7], [1.0, 0.0, 0.0]]),   # oblique: snapped to the nearest axes
])
def test_reorientation_round_trip_is_exact(direction):
    shape_ijk = (5, 6, 7)
    array = np.arange(np.prod(shape_ijk)).reshape(shape_ijk[::-1])
    orientation = AxisReorientation.to_ras(direction, shape_ijk)
    working = orientation.array_to_working(array)
    np.testing.assert_array_equal(orientation.array_to_stored(working), array)
    # A voxel keeps its value when its index is mapped to the working grid.
    ijk = np.array([[1, 2, 3], [4, 0, 6]])
    working_ijk = orientation.points_to_working(ijk).astype(int)
    for (i, j, k), (wi, wj, wk) in zip(ijk, working_ijk):
        assert working[wk, wj, wi] == array[k, j, i]
    # The working axes point R, A, S (positive diagonal of the working direction).
    working_direction = direction[:, list(orientation.source_axis)] * np.where(orientation.flipped, -1, 1)
    assert np.all(np.diag(working_direction) > 0)
