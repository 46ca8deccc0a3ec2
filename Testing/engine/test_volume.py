"""Volume geometry: voxel <-> RAS <-> LPS, checked against SimpleITK's own index/physical-point transforms."""
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from medsegx_core.data.volume import LPS_FROM_RAS, Volume, lps_to_ras, ras_to_lps
from medsegx_core.errors import GeometryError


def rotation(quaternion) -> np.ndarray:
    w, x, y, z = np.asarray(quaternion, dtype=float) / np.linalg.norm(quaternion)
    matrix = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    matrix[np.abs(matrix) < 1e-12] = 0.0  # ITK's SVD fails on subnormal entries (a limit of ITK, not of geometry)
    return matrix


finite = st.floats(-300, 300, allow_nan=False)
quaternions = st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda q: np.linalg.norm(q) > 0.1)
flips = st.tuples(*[st.sampled_from([-1.0, 1.0]) for _ in range(3)])
spacings = st.tuples(*[st.floats(0.2, 6.0) for _ in range(3)])
shapes = st.tuples(*[st.integers(1, 9) for _ in range(3)])
points = st.lists(st.tuples(finite, finite, finite), min_size=1, max_size=6)


@st.composite
def volumes(draw):
    direction = rotation(draw(quaternions)) @ np.diag(draw(flips))  # oblique and possibly mirrored axes
    shape_kji = draw(shapes)
    return Volume(np.zeros(shape_kji, np.int16), draw(spacings), np.array(draw(st.tuples(finite, finite, finite))),
                  direction)


@settings(max_examples=150, deadline=None)
@given(volumes(), points)
def test_voxel_ras_lps_round_trips_on_oblique_flipped_grids(volume, pts):
    pts = np.array(pts)
    ras = volume.ijk_to_ras_points(pts)
    assert np.allclose(volume.ras_to_ijk_points(ras), pts, atol=1e-7)
    lps = volume.ijk_to_lps_points(pts)
    assert np.allclose(volume.lps_to_ijk_points(lps), pts, atol=1e-7)
    assert np.allclose(lps, ras_to_lps(ras)) and np.allclose(lps_to_ras(lps), ras)
    # distances in mm: one step along i moves spacing[0] mm, whatever the rotation
    step = volume.ijk_to_ras_points(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float))
    assert np.allclose(np.linalg.norm(step[1:] - step[0], axis=1), volume.spacing)


@settings(max_examples=60, deadline=None)
@given(volumes(), points)
def test_lps_matches_simpleitk_physical_points(volume, pts):
    """ITK is the independent reference for LPS: its continuous index -> physical point must equal ours."""
    image = volume.to_sitk()
    for p in pts:
        expected = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in p))
        assert np.allclose(volume.ijk_to_lps_points(p), expected, atol=1e-6)
        assert np.allclose(volume.ijk_to_ras_points(p), LPS_FROM_RAS @ np.array(expected), atol=1e-6)
    back = Volume.from_sitk(image)
    assert back.same_grid(volume, tol=1e-9) and np.array_equal(back.array, volume.array)


def test_ijk_to_ras_is_direction_times_spacing_plus_origin():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1, -1, 1])
    volume = Volume(np.zeros((24, 40, 48), np.int16), (0.8, 0.8, 2.5), [112.5, -85.25, 40.0], direction)
    expected = np.eye(4)
    expected[:3, :3] = direction * [0.8, 0.8, 2.5]
    expected[:3, 3] = [112.5, -85.25, 40.0]
    assert volume.shape_ijk == (48, 40, 24)
    assert np.allclose(volume.ijk_to_ras, expected)
    assert np.allclose(volume.ijk_to_lps, np.diag([-1, -1, 1, 1]) @ expected)
    assert np.allclose(volume.ras_to_ijk @ volume.ijk_to_ras, np.eye(4))
    assert np.allclose(volume.origin_lps, [-112.5, 85.25, 40.0])
    assert np.allclose(volume.direction_lps, np.diag([-1, -1, 1]) @ direction)
    # bounds cover whole voxels: the corner voxel's outer edge, not its centre
    flat = Volume(np.zeros((2, 3, 4)), (1, 2, 3), [10, 20, 30], np.eye(3))
    assert np.allclose(flat.ras_bounds(), [[9.5, 19, 28.5], [13.5, 25, 34.5]])
    assert flat.contains_ijk([[-0.5, 0, 0], [3.5, 2.5, 1.5], [3.6, 0, 0], [0, 0, -0.51]]).tolist() == \
        [True, True, False, False]


def test_same_grid_and_with_array():
    volume = Volume(np.arange(24).reshape(2, 3, 4), (1, 1, 2), [0, 0, 0], np.eye(3), modality="CT", source="x.nii")
    mask = volume.with_array(np.ones((2, 3, 4), np.uint8))
    assert mask.same_grid(volume) and mask.modality == "CT" and mask.array.dtype == np.uint8
    with pytest.raises(GeometryError, match="shape"):
        volume.with_array(np.ones((3, 3, 4)))
    moved = Volume(volume.array, volume.spacing, [0, 0, 0.01], np.eye(3))
    assert "origin" in volume.grid_difference(moved)
    assert volume.same_grid(moved, tol=0.1)
    assert "spacing" in volume.grid_difference(Volume(volume.array, (1, 1, 2.5), [0, 0, 0], np.eye(3)))
    assert "size" in volume.grid_difference(Volume(np.zeros((2, 3, 5)), (1, 1, 2), [0, 0, 0], np.eye(3)))
    assert "directions" in volume.grid_difference(Volume(volume.array, (1, 1, 2), [0, 0, 0], np.diag([-1, 1, 1])))


@settings(max_examples=60, deadline=None)
@given(volumes(), st.data())
def test_a_slab_keeps_every_voxel_at_its_place_in_space(volume, data):
    depth = volume.array.shape[0]
    volume = volume.with_array(np.arange(volume.array.size).reshape(volume.array.shape))
    first = data.draw(st.integers(0, depth - 1))
    stop = data.draw(st.integers(first + 1, depth))
    slab = volume.slab(first, stop)
    assert slab.array.shape[0] == stop - first
    np.testing.assert_array_equal(slab.array, volume.array[first:stop])
    # voxel (i, j, k) of the slab is voxel (i, j, k + first) of the volume: same RAS point
    corners = np.array([[0, 0, 0], [slab.array.shape[2] - 1, slab.array.shape[1] - 1, stop - first - 1]], float)
    np.testing.assert_allclose(slab.ijk_to_ras_points(corners), volume.ijk_to_ras_points(corners + [0, 0, first]),
                               atol=1e-6)
    with pytest.raises(GeometryError, match="not within"):
        volume.slab(first, depth + 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(array=np.zeros((3, 3))), "3D"),
    (dict(spacing=(1, 0, 1)), "spacing"),
    (dict(origin_ras=[0, np.nan, 0]), "origin"),
    (dict(direction_ras=[[1, 0.3, 0], [0, 1, 0], [0, 0, 1]]), "orthonormal"),
])
def test_invalid_geometry_is_a_geometry_error(kwargs, message):
    args = dict(array=np.zeros((2, 2, 2)), spacing=(1, 1, 1), origin_ras=[0, 0, 0], direction_ras=np.eye(3))
    args.update(kwargs)
    with pytest.raises(GeometryError, match=message):
        Volume(**args)
