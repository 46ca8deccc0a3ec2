"""Augmentation of the training loop (training/domain_randomisation.py): each transform does what it promises on
the real abdominal CT, MONAI's transforms draw from the caller's seed (a recipe + seed reproduces every draw), and
the sampler (training/sampling.py) draws with them."""
from __future__ import annotations

import numpy as np
import pytest

from medsegx_core.training.domain_randomisation import (absent_slab, bias_field, intensity_jitter,
                                                        label_intensity_shift, random_affine,
                                                        random_intensity_curve, slab_region)
from medsegx_core.training.sampling import Sampler, SamplingSettings
from medsegx_core.training.starter_data import case_specs, load_cases


@pytest.fixture(scope="module")
def ct_case(data_dir):
    return load_cases(data_dir, case_specs(["ct_abdomen"]))[0]


def test_each_structure_moves_by_its_own_offset_and_the_background_stays(ct_case):
    image, labels = ct_case.labelled.image, ct_case.labelled.labels
    shifted = label_intensity_shift(image, labels, np.random.default_rng(0))
    assert shifted.dtype == np.float32 and shifted.min() >= 0.0 and shifted.max() <= 1.0
    np.testing.assert_array_equal(shifted[labels == 0], image[labels == 0])
    offsets = {}
    for structure in ct_case.structures[:16]:
        inside = labels == structure.label
        unclipped = (shifted[inside] > 0.0) & (shifted[inside] < 1.0)
        if not unclipped.any():
            continue    # a large negative offset on a dark structure: all of it clipped to 0
        moved = shifted[inside][unclipped] - image[inside][unclipped]
        assert np.ptp(moved) < 1e-5, f"{structure.name}: one offset for the whole structure"
        offsets[structure.name] = float(np.median(moved))
    assert len(offsets) >= 8
    assert len({round(v, 4) for v in offsets.values()}) == len(offsets), "every structure gets its own offset"


def test_intensity_curves_are_functions_of_intensity_that_can_reverse_tissue_order(ct_case):
    image, labels = ct_case.labelled.image, ct_case.labelled.labels
    liver = next(s for s in ct_case.structures if s.name == "liver").label
    fat_like = image[(labels == 0) & (image > 0.05)]
    darker_tissue, liver_grey = np.percentile(fat_like, 20), np.median(image[labels == liver])
    assert darker_tissue < liver_grey
    reversed_order = 0
    for seed in range(20):
        curve_rng = np.random.default_rng(seed)
        out = random_intensity_curve(image, curve_rng)
        assert out.min() >= 0.0 and out.max() <= 1.0
        same = random_intensity_curve(np.array([darker_tissue, liver_grey], dtype=np.float32),
                                      np.random.default_rng(seed))
        reversed_order += bool(same[0] > same[1])
    # About half of random curves put the darker tissue above the liver, as MR sequences do.
    assert 3 <= reversed_order <= 17


def test_bias_fields_are_smooth_and_not_constant(ct_case):
    flat = np.full((32, 64, 64), 0.5, dtype=np.float32)
    out = bias_field(flat, np.random.default_rng(1))
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    spread = out.max() - out.min()
    assert spread > 0.05, "a field that changes the image"
    for axis in range(3):
        assert np.abs(np.diff(out, axis=axis)).max() < spread / 8, "smooth from voxel to voxel"
    assert (out < 0.5).any() and (out > 0.5).any(), "darker and brighter regions"


def test_monai_transforms_draw_from_the_callers_generator(ct_case):
    """Same seed, same draw (whatever MONAI's global state); another seed, another draw."""
    import monai

    image = ct_case.labelled.image[:32, :96, :96].copy()
    for transform in (bias_field, intensity_jitter):
        first = transform(image, np.random.default_rng(3))
        monai.utils.set_determinism(seed=123)       # another global state must not matter
        again = transform(image, np.random.default_rng(3))
        monai.utils.set_determinism(seed=None)
        assert np.array_equal(first, again), transform.__name__
        assert not np.array_equal(first, transform(image, np.random.default_rng(4))), transform.__name__
        assert first.dtype == np.float32 and 0.0 <= first.min() and first.max() <= 1.0


def test_a_random_affine_moves_image_and_mask_together(ct_case):
    liver = next(s for s in ct_case.structures if s.name == "liver")
    lo = np.argwhere(ct_case.labelled.mask(liver)).min(0)
    window = tuple(slice(a, a + n) for a, n in zip(lo, (40, 96, 96)))
    image = ct_case.labelled.image[window].copy()
    mask = ct_case.labelled.mask(liver)[window].astype(np.float32)
    moved, moved_mask = random_affine(image, mask, np.random.default_rng(0))
    assert moved.shape == image.shape and set(np.unique(moved_mask)) <= {0.0, 1.0}
    assert not np.array_equal(moved_mask, mask) and 0.7 < moved_mask.sum() / mask.sum() < 1.4
    # the mask still marks liver grey: the image moved with it
    assert abs(np.median(moved[moved_mask > 0]) - np.median(image[mask > 0])) < 0.03
    again = random_affine(image, mask, np.random.default_rng(0))
    assert np.array_equal(again[0], moved) and np.array_equal(again[1], moved_mask)


def test_slabs_keep_the_centre_and_only_a_thin_stack_of_slices():
    rng = np.random.default_rng(0)
    shape, centre = (112, 97, 122), (80, 40, 60)
    for _ in range(200):
        region = slab_region(shape, centre, rng)
        lengths = [r.stop - r.start for r in region]
        assert all(r.start <= c < r.stop and 0 <= r.start and r.stop <= n
                   for r, c, n in zip(region, centre, shape))
        assert 4 <= lengths[0] <= round(0.5 * shape[0]) and lengths[1] >= round(0.7 * shape[1])


def test_the_domain_randomised_sampler_draws_valid_samples_unlike_the_default_ones(ct_case):
    settings = SamplingSettings().with_domain_randomisation()
    randomised = Sampler([ct_case.labelled], (32, 128, 128), 3, settings).batch(0, range(24))
    assert all(s.image.shape == (32, 128, 128) and 0.0 <= s.image.min() and s.image.max() <= 1.0 and s.mask.any()
               for s in randomised)
    plain = Sampler([ct_case.labelled], (32, 128, 128), 3).batch(0, range(24))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(randomised, plain))
    # a sample is a function of (seed, step, index): drawn alone or in a batch, it is the same
    alone = Sampler([ct_case.labelled], (32, 128, 128), 3, settings).sample(0, 5)
    assert np.array_equal(alone.image, randomised[5].image) and alone.name == randomised[5].name


def test_absent_slabs_hold_none_of_the_structure(ct_case):
    rng = np.random.default_rng(0)
    for structure in ct_case.structures[:12]:
        mask = ct_case.labelled.mask(structure)
        for _ in range(20):
            region = absent_slab(mask, 6, rng)
            if region is None:      # the structure leaves fewer than 6 free slices on both sides
                occupied = np.flatnonzero(mask.any(axis=(1, 2)))
                assert occupied[0] < 6 and mask.shape[0] - 1 - occupied[-1] < 6
                break
            assert region.stop - region.start >= 6 and 0 <= region.start and region.stop <= mask.shape[0]
            assert not mask[region].any()


def test_absent_structure_samples_name_a_structure_outside_the_view_with_an_empty_target(ct_case):
    from dataclasses import replace

    settings = replace(SamplingSettings().with_domain_randomisation(), absent_probability=1.0)
    samples = Sampler([ct_case.labelled], (32, 128, 128), 5, settings).batch(0, range(12))
    assert all(s.kind == "text" and s.view == "zoom-out" and not s.mask.any() and s.image.std() > 0.01
               and s.context_rows for s in samples)
    # Off by default: the default and domain-randomised samplers draw no such samples.
    assert SamplingSettings().absent_probability == SamplingSettings().with_domain_randomisation().absent_probability
    assert SamplingSettings().absent_probability == 0.0
