"""Prompt-coordinate conventions of the 3D prompt encoder: SegVol's quirk (default, parity-tested elsewhere) and
the "aligned" option for models trained here, whose prompt encodings coincide with the image grid's."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from medsegx_core.modeling.build import build_model
from medsegx_core.modeling.config import preset as get_preset


def _tiny(coordinates: str):
    config = get_preset("tiny")
    config = dataclasses.replace(config, prompt_encoder=dataclasses.replace(config.prompt_encoder,
                                                                             coordinates=coordinates))
    torch.manual_seed(0)
    return build_model(config)


def test_aligned_point_encoding_equals_the_dense_grid_encoding_at_that_place():
    model = _tiny("aligned")
    encoder = model.prompt_encoder
    dense = encoder.get_dense_pe()[0]                        # (C, 8, 16, 16)
    scale = [s // g for s, g in zip(model.config.image_size, model.config.embedding_grid)]   # voxels per cell
    for cell in [(0, 0, 0), (3, 7, 11), (7, 15, 15)]:
        # the voxel coordinate (before the +0.5 shift) whose shifted value is the cell centre
        centre = torch.tensor([[[(c + 0.5) * s - 0.5 for c, s in zip(cell, scale)]]])
        encoded = encoder.pe_layer.from_voxel_coords(centre + 0.5, model.config.image_size, "aligned")[0, 0]
        torch.testing.assert_close(encoded, dense[:, cell[0], cell[1], cell[2]], atol=1e-4, rtol=0)


def test_segvol_convention_is_the_default_and_differs_from_aligned():
    assert get_preset("segvol").prompt_encoder.coordinates == "segvol"
    official, aligned = _tiny("segvol"), _tiny("aligned")
    coords = torch.tensor([[[10.0, 100.0, 50.0]]])
    a = official.prompt_encoder.pe_layer.from_voxel_coords(coords, (32, 256, 256), "segvol")
    b = aligned.prompt_encoder.pe_layer.from_voxel_coords(coords, (32, 256, 256), "aligned")
    assert (a - b).abs().max() > 0.1


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="'segvol' or 'aligned'"):
        _tiny("ijk")
