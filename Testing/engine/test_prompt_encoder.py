"""Prompt-coordinate conventions of the 3D prompt encoder: SegVol's quirk (default, parity-tested elsewhere) and
the "aligned" option for models trained here, whose prompt encodings coincide with the image grid's; and the
optional dense box/click marks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from medsegx_core.modeling.build import build_model
from medsegx_core.modeling.config import preset as get_preset


def _tiny(coordinates: str, dense_prompts: bool = False):
    config = get_preset("tiny")
    config = dataclasses.replace(config, prompt_encoder=dataclasses.replace(
        config.prompt_encoder, coordinates=coordinates, dense_prompts=dense_prompts))
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


def test_dense_marks_cover_the_box_cells_and_the_clicked_cells():
    model = _tiny("aligned", dense_prompts=True)
    encoder = model.prompt_encoder
    assert encoder.image_embedding_size == (8, 16, 16)              # cells of 4 x 16 x 16 voxels
    with torch.no_grad():   # exact small integers, so the marks can be told apart by value
        encoder.no_mask_embed.weight.zero_()
        encoder.box_cells_embed.fill_(1.0)
        encoder.click_cells_embed[0].fill_(10.0)
        encoder.click_cells_embed[1].fill_(100.0)
    box = torch.tensor([[4.0, 16.0, 20.0, 11.0, 47.0, 20.0]])      # d 4-11, h 16-47, w 20 (inside one cell)
    clicks = (torch.tensor([[[5.0, 20.0, 33.0], [31.0, 255.0, 255.0], [0.0, 0.0, 0.0]]]), torch.tensor([[1, 0, -1]]))
    _, dense = encoder(clicks, box)
    marks = dense[0, 0]
    covered = torch.nonzero(marks % 10 == 1)
    assert covered.min(0).values.tolist() == [1, 1, 1] and covered.max(0).values.tolist() == [2, 2, 1]
    assert torch.nonzero(marks >= 100).tolist() == [[1, 1, 2]]      # the positive click's cell
    assert torch.nonzero((marks % 100) >= 10).tolist() == [[7, 15, 15]]   # the negative click's; padding: none


def test_dense_marks_are_an_addition_to_the_official_layout():
    plain, marked = _tiny("aligned"), _tiny("aligned", dense_prompts=True)
    assert not get_preset("segvol").prompt_encoder.dense_prompts
    assert "prompt_encoder.box_cells_embed" not in plain.state_dict()
    missing = marked.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["prompt_encoder.box_cells_embed", "prompt_encoder.click_cells_embed"]
    embedding = torch.randn(1, plain.config.embed_dim, *plain.config.embedding_grid)
    box = torch.tensor([[2.0, 30.0, 40.0, 20.0, 200.0, 150.0]])
    text = torch.randn(1, plain.config.embed_dim)
    with torch.no_grad():   # text alone adds no mark; a box does
        torch.testing.assert_close(marked.decode(embedding, text), plain.decode(embedding, text))
        assert (marked.decode(embedding, boxes=box) - plain.decode(embedding, boxes=box)).abs().max() > 1e-3
