"""Prompts: RAS or voxel points/boxes to voxel space, exact on oblique and flipped grids; clear PromptErrors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsegx_core.data.readers import read_volume
from medsegx_core.data.volume import LPS_FROM_RAS, Volume
from medsegx_core.errors import PromptError
from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts
from test_volume import volumes


def oblique_volume(degrees=30.0, flip=(-1, 1, -1)):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    direction = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.diag(flip)
    return Volume(np.zeros((10, 20, 30), np.int16), (0.7, 0.9, 2.5), [-40.0, 12.5, 88.0], direction)


@settings(max_examples=120, deadline=None)
@given(volumes(), st.data())
def test_ras_points_land_in_the_voxel_they_were_taken_from(volume, data):
    """Pick a voxel and an offset inside it, go to RAS, come back through the prompt: same voxel, same offset."""
    ijk = np.array([data.draw(st.integers(0, n - 1)) for n in volume.shape_ijk], dtype=float)
    offset = np.array([data.draw(st.floats(-0.49, 0.49)) for _ in range(3)])
    ras = volume.ijk_to_ras_points(ijk + offset)
    positive = data.draw(st.booleans())
    voxel = Prompts(text="liver", points=(PointPrompt(tuple(ras), positive),)).to_voxel(volume)
    assert np.allclose(voxel.points_ijk[0], ijk + offset, atol=1e-6)
    assert np.array_equal(np.rint(voxel.points_ijk[0]), ijk)
    assert voxel.labels.tolist() == [int(positive)]
    # ITK agrees (it works in LPS)
    image = volume.to_sitk()
    itk_ijk = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in LPS_FROM_RAS @ ras))
    assert np.allclose(itk_ijk, voxel.points_ijk[0], atol=1e-6)


def test_points_on_a_real_flipped_mri(data_dir):
    volume = read_volume(data_dir / "mri/brain_tumor_t1.nrrd")  # LPS direction diag(1, -1, 1): R-L mirrored
    assert np.allclose(volume.direction_ras, np.diag([-1, 1, 1]))
    ijk = np.array([200.0, 31.0, 12.0])
    ras = volume.ijk_to_ras_points(ijk)
    assert ras[0] < volume.origin_ras[0]  # i runs towards the patient's left (decreasing R)
    points = (PointPrompt(tuple(ras)), PointPrompt((5, 6, 7), positive=False, space="ijk"))
    voxel = Prompts(points=points).to_voxel(volume)
    assert np.allclose(voxel.points_ijk, [ijk, [5, 6, 7]]) and voxel.labels.tolist() == [1, 0]
    assert voxel.text is None and voxel.box_ijk is None


def test_ras_box_on_flipped_and_oblique_grids():
    flipped = Volume(np.zeros((10, 20, 30)), (1.0, 2.0, 3.0), [100, 50, -20], np.diag([-1, -1, 1]))
    box = BoxPrompt(flipped.ijk_to_ras_points([3, 4, 5]), flipped.ijk_to_ras_points([20, 15, 8]))
    assert np.allclose(Prompts(box=box).to_voxel(flipped).box_ijk, [[3, 4, 5], [20, 15, 8]])
    # corners given in any order: min/max per axis
    swapped = BoxPrompt(flipped.ijk_to_ras_points([20, 4, 8]), flipped.ijk_to_ras_points([3, 15, 5]))
    assert np.allclose(Prompts(box=swapped).to_voxel(flipped).box_ijk, [[3, 4, 5], [20, 15, 8]])

    oblique = oblique_volume()
    centre = oblique.ijk_to_ras_points([15, 10, 5])
    box = BoxPrompt(centre - 3, centre + 3)  # a 6 mm cube, axis-aligned in RAS
    voxel_box = Prompts(box=box).to_voxel(oblique).box_ijk
    corners_ijk = oblique.ras_to_ijk_points(box.corners())
    assert np.allclose(voxel_box, [corners_ijk.min(0), corners_ijk.max(0)])
    assert np.all(voxel_box[0] < [15, 10, 5]) and np.all(voxel_box[1] > [15, 10, 5])
    # the RAS cube seen in voxels: wider along the 0.7 mm axis than along the 2.5 mm one
    assert (voxel_box[1] - voxel_box[0])[0] > (voxel_box[1] - voxel_box[0])[2]


def test_box_overhanging_the_edge_is_clipped_and_a_flat_box_is_kept():
    volume = oblique_volume()
    voxel = Prompts(box=BoxPrompt((-5, 2, 1), (12, 40, 1), space="ijk")).to_voxel(volume)
    assert np.allclose(voxel.box_ijk, [[0, 2, 1], [12, 19, 1]])


def test_outside_prompts_name_the_prompt_and_the_volume_bounds():
    volume = Volume(np.zeros((10, 20, 30)), (1.0, 1.0, 1.0), [0, 0, 0], np.eye(3))
    with pytest.raises(PromptError) as info:
        Prompts(points=(PointPrompt((10, 5, 2)), PointPrompt((40.0, 5, 2)))).to_voxel(volume)
    message = str(info.value)
    assert "positive point (40, 5, 2) (RAS mm) is outside the volume" in message
    assert "R [-0.5, 29.5], A [-0.5, 19.5], S [-0.5, 9.5]" in message and "\n" not in message
    with pytest.raises(PromptError, match=r"negative point \(0, 0, 10\) \(voxel ijk\) is outside"):
        Prompts(text="liver", points=(PointPrompt((0, 0, 10), False, "ijk"),)).to_voxel(volume)
    with pytest.raises(PromptError, match=r"box \(40, 0, 0\) to \(50, 5, 5\) \(RAS mm\) is outside the volume"):
        Prompts(box=BoxPrompt((40, 0, 0), (50, 5, 5))).to_voxel(volume)
    # the edge of the last voxel is still inside
    assert Prompts(points=(PointPrompt((29.5, 19.5, 9.5)),)).to_voxel(volume).points_ijk.shape == (1, 3)


@pytest.mark.parametrize("prompts, message", [
    (Prompts(), "no text, point or box"),
    (Prompts(text="   "), "no text, point or box"),
    (Prompts(points=(PointPrompt((1, 1, 1), positive=False),)), "only negative points"),
])
def test_empty_prompts_are_refused(prompts, message):
    volume = Volume(np.zeros((4, 4, 4)), (1, 1, 1), [0, 0, 0], np.eye(3))
    with pytest.raises(PromptError, match=message):
        prompts.to_voxel(volume)


@pytest.mark.parametrize("make, message", [
    (lambda: PointPrompt((1, np.nan, 2)), "three finite numbers"),
    (lambda: PointPrompt((1, 2)), "three finite numbers"),
    (lambda: PointPrompt("abc"), "not three numbers"),
    (lambda: PointPrompt((1, 2, 3), space="lps"), "space must be"),
    (lambda: BoxPrompt((0, 0, 0), (1, 1, np.inf)), "box prompt corner"),
    (lambda: Prompts(text=3), "string"),
    (lambda: Prompts(points=((1, 2, 3),)), "PointPrompt"),
])
def test_malformed_prompts_are_refused(make, message):
    with pytest.raises(PromptError, match=message):
        make()


def test_text_only_and_describe():
    volume = Volume(np.zeros((4, 4, 4)), (1, 1, 1), [0, 0, 0], np.eye(3))
    voxel = Prompts(text="  left kidney ").to_voxel(volume)
    assert voxel.text == "left kidney" and voxel.points_ijk.shape == (0, 3) and voxel.labels.shape == (0,)
    assert Prompts(text="liver", points=(PointPrompt((1, 2, 3)),)).describe() == \
        "text 'liver', positive point (1, 2, 3) (RAS mm)"
