"""Write a SegVol-parity-shaped fixture folder for another volume, from OUR engine's outputs.

This is not a parity fixture: the official SegVol code is not installed here, so the expected arrays are what this
engine computes (with the public fixture's tiny checkpoint and tokenizer). What it checks is the other half of the
parity tests' contract: that they take every input, prompt, case name, expected statistic and shape from the
fixture files. Pointed at such a folder (``MEDSEGX_SEGVOL_FIXTURE=...``), a test that hard-coded anything of the
public fixture (its volume, the liver box, the crop shape, a sum) fails; the decoupled tests pass.

The folder follows the public fixture's layout and README (sections 5-6): ``pipeline_preprocess.npz``,
``model_input.npz``, ``model_case_{text,box,points,text_box,text_points}.npz``, ``pipeline_{liver_text_box,
spleen_text}.npz`` and ``fixtures.json`` with the same keys the tests read; the prompts follow the README's rules
(the box of the resized label; points by ``summary.points_rule``).

    python Testing/swap_fixture.py OUT [--volume mri/totalseg_mr.nii.gz --labels mri/totalseg_mr_labels.nii.gz]
    MEDSEGX_SEGVOL_FIXTURE=OUT python -m pytest Testing/engine/test_pipeline_parity.py ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_paths import DATA, SEGVOL_FIXTURE  # noqa: E402

from medsegx_core.data.readers import read_volume  # noqa: E402
from medsegx_core.data.volume import Volume  # noqa: E402
from medsegx_core.inference.preprocessing import preprocess  # noqa: E402
from medsegx_core.inference.zoom import ZoomMaps  # noqa: E402
from medsegx_core.predictor import Predictor  # noqa: E402
from medsegx_core.prompts import BoxPrompt, Prompts  # noqa: E402
from medsegx_core.weights.store import load_model  # noqa: E402

CATEGORIES = {"liver": 5, "spleen": 1}   # TotalSegmentator label values (README 8: ids 5 and 1)
COPIED = ("config.json", "hf_style.bin", "github_style.pth", "model.safetensors")


def _float32_stats(values: np.ndarray) -> dict:
    values = values.astype(np.float64)
    return {"sum": float(values.sum()), "sum_sq": float((values ** 2).sum()), "min": float(values.min()),
            "max": float(values.max())}


def _nearest(mask: np.ndarray, target: np.ndarray) -> list:
    """The voxel of ``mask`` nearest ``target`` (squared Euclidean in index space, first index on ties)."""
    voxels = np.argwhere(mask)
    return voxels[int(np.argmin(((voxels - target) ** 2).sum(axis=1)))].tolist()


def make(out: Path, volume_path: Path, labels_path: Path) -> Path:
    public = SEGVOL_FIXTURE / "public"
    (out / "public").mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(public / name, out / "public" / name)
    shutil.copytree(SEGVOL_FIXTURE / "tokenizer", out / "tokenizer", dirs_exist_ok=True)

    raw = read_volume(volume_path).array.astype(np.int32)
    labels = read_volume(labels_path).array
    prepared = preprocess(raw, np.eye(3), "official")
    model = load_model(public / "model.safetensors", tokenizer=SEGVOL_FIXTURE / "tokenizer")
    shape = tuple(model.config.image_size)
    maps = ZoomMaps.build(prepared.cropped_shape, shape)
    crop = prepared.crop_slices
    label_crop = np.stack([labels[crop] == value for value in CATEGORIES.values()]).astype(np.uint8)
    lo, hi = np.asarray(prepared.crop_lo), np.asarray(prepared.crop_hi) - 1
    preprocess_arrays = dict(raw_volume=raw, normalised_cropped=prepared.cropped, label_cropped=label_crop,
                             crop_lo_zyx=lo.astype(np.int64), crop_hi_zyx_inclusive=hi.astype(np.int64))
    for axis, name in enumerate("dhw"):
        preprocess_arrays[f"zoom_index_{name}"] = maps.out[axis]
        preprocess_arrays[f"back_index_{name}"] = maps.back[axis]
    np.savez(out / "public" / "pipeline_preprocess.npz", **preprocess_arrays)
    image = maps.zoom_out(prepared.cropped)
    zoom_label = np.stack([label[np.ix_(*maps.out)] for label in label_crop])[:, None]
    np.savez(out / "public" / "model_input.npz", image=image[None, None], zoom_label=zoom_label)

    stats = prepared.stats
    summary = {"preprocess": {
        "foreground_normalisation": {"fg_threshold_mean": stats.threshold, "fg_count": stats.foreground_count,
                                     "fg_lower_p00_05": stats.lower, "fg_upper_p99_95": stats.upper,
                                     "fg_mean": stats.mean, "fg_std": stats.std},
        "minmax": {"min_before": stats.minmax_min, "range_before": stats.minmax_range},
        "cropped_shape_zyx": list(prepared.cropped_shape), "zoom_out_shape": list(shape)}}
    mismatch_out, mismatch_back = [], []
    for axis, (c, m) in enumerate(zip(prepared.cropped_shape, shape)):
        mismatch_out.append(int((maps.out[axis] != ((2 * np.arange(m) + 1) * c) // (2 * m)).sum()))
        mismatch_back.append(int((maps.back[axis] != (np.arange(c) * m) // c).sum()))
    summary["resize_index_maps"] = {"zoom_out_nearest_exact_mismatch_vs_exact_rational_formula": mismatch_out,
                                    "back_nearest_mismatch_vs_exact_rational_formula": mismatch_back}
    # The box prompt: the inclusive box of the resized label, and the crop box it comes from (README 5.2).
    liver_crop = np.argwhere(label_crop[0])
    crop_box = liver_crop.min(axis=0).tolist() + liver_crop.max(axis=0).tolist()
    zoomed_liver = np.argwhere(zoom_label[0, 0])
    zoomed_box = zoomed_liver.min(axis=0).tolist() + zoomed_liver.max(axis=0).tolist()
    original_box = [int(v) for v in np.asarray(crop_box) + np.concatenate([lo, lo])]
    from_cube = maps.box_to_model(crop_box[:3], crop_box[3:]).astype(int).tolist()
    summary["liver_box"] = {"original_zyx_inclusive": original_box, "cropped_zyx_inclusive": crop_box,
                            "zoomed_official_dhw_inclusive": zoomed_box,
                            "zoomed_from_original_box_via_nearest_exact_resize": from_cube}
    # Points (fixtures.json -> summary.points_rule), in the resized labels.
    liver_zoomed, spleen_zoomed = zoom_label[0, 0].astype(bool), zoom_label[1, 0].astype(bool)
    centroid = np.argwhere(liver_zoomed).mean(axis=0)
    points = [_nearest(liver_zoomed, centroid),
              _nearest(liver_zoomed, (centroid + np.asarray(zoomed_box[3:])) / 2),
              _nearest(spleen_zoomed, np.argwhere(spleen_zoomed).mean(axis=0))]
    arrays: dict = {}

    with torch.no_grad():
        embedding = model.encode_image(torch.from_numpy(image)[None, None])
        texts = {}
        summary["tokens"] = {}
        for name in CATEGORIES:
            tokens = model.text_encoder.tokenize([name])
            texts[name] = (tokens, model.text_encoder.pooled(tokens["input_ids"], tokens["attention_mask"]),
                           model.encode_text([name]))
            summary["tokens"][name] = {"input_ids": tokens["input_ids"][0].tolist()}
        summary["model_cases"] = {}
        box = torch.tensor([zoomed_box], dtype=torch.float32)
        clicks = (torch.tensor([points], dtype=torch.float32), torch.tensor([[1, 1, 0]]))
        for case, (text, use_box, use_points) in {
                "text": ("liver", False, False), "box": (None, True, False), "points": (None, False, True),
                "text_box": ("liver", True, False), "text_points": ("liver", False, True)}.items():
            text_embedding = texts[text][2] if text else None
            details = model.decode_with_details(embedding, text_embedding, clicks if use_points else None,
                                                box if use_box else None)
            logits = model.upsample_logits(details.logits_lowres)
            stored = dict(logits_lowres=details.logits_lowres.numpy(), logits=logits.numpy().astype(np.float16),
                          iou_pred=details.iou_pred.numpy(), sparse_embeddings=details.sparse_embeddings.numpy())
            if text:
                stored.update(input_ids=texts[text][0]["input_ids"].numpy(), clip_pooled=texts[text][1].numpy(),
                              text_embedding=text_embedding.numpy())
            if use_box:
                stored["boxes"] = box.numpy()
            if use_points:
                stored.update(point_coords=clicks[0].numpy(), point_labels=clicks[1].numpy())
            if case == "text":
                stored.update(image_embedding=embedding.numpy(),
                              dense_pe=model.prompt_encoder.get_dense_pe().numpy())
            np.savez(out / "public" / f"model_case_{case}.npz", **stored)
            summary["model_cases"][case] = {"text": text}
            arrays[f"model_case_{case}.npz"] = {"logits": {"stats_of_float32_source": _float32_stats(logits.numpy())}}

    predictor = Predictor(model, device="cpu", precision="fp32", preprocessing="official")
    predictor.set_volume(Volume(raw, (1.0, 1.0, 1.0), np.zeros(3), np.eye(3)))
    summary["pipeline"] = {}
    for case, (category, use_box) in {"liver_text_box": ("liver", True), "spleen_text": ("spleen", False)}.items():
        box_prompt = BoxPrompt(tuple(original_box[2::-1]), tuple(original_box[5:2:-1]), space="ijk") \
            if use_box else None
        prompts = Prompts(text=category, box=box_prompt)
        result = predictor.segment(prompts, return_logits=True)
        crop_prompts = predictor.map_prompts(prompts)
        coarse = predictor.zoom_out(crop_prompts)
        plan = predictor.plan_zoom_in(coarse, crop_prompts)
        windows = [predictor.decode_window(plan, i, crop_prompts, coarse) for i in range(len(plan))]
        back = maps.back_to_crop(coarse.logits)
        final = result.logits[crop]
        stored = dict(
            zoomout_logits_lowres=coarse.logits_lowres.numpy(), zoomout_logits_back=back.astype(np.float16),
            roi_dhw=np.asarray(plan.roi_dhw, np.int64),
            roi_crop_shape=np.asarray([b - a for a, b in zip(plan.region_lo, plan.region_hi)], np.int64),
            window_starts_padded_dhw=np.asarray(plan.starts_padded, np.int64),
            window_pad_before_dhw=np.asarray(plan.pad_before, np.int64),
            window_pad_after_dhw=np.asarray(plan.pad_after, np.int64),
            window_boxes=np.stack([np.full(6, np.nan, np.float32) if w.prompts.box is None else w.prompts.box
                                   for w in windows]),
            window_logits_lowres=np.concatenate([w.logits_lowres.numpy() for w in windows]),
            final_logits_cropped=final.astype(np.float16), final_mask_cropped=result.mask[crop],
            final_mask_original=result.mask)
        if use_box:
            stored["zoomout_box"] = coarse.model_box[None]
        np.savez(out / "public" / f"pipeline_{case}.npz", **stored)
        summary["pipeline"][case] = {
            "category": category, "use_text": True, "use_box": use_box, "use_point": False,
            "n_windows": len(plan), "zoomout_prompt": {"text": category,
                                                      "box": coarse.model_box.tolist() if use_box else None}}
        arrays[f"pipeline_{case}.npz"] = {name: {"stats_of_float32_source": _float32_stats(values)}
                                          for name, values in (("zoomout_logits_back", back),
                                                               ("final_logits_cropped", final))}
    record = {"fixture": "swap (our engine's outputs; not a parity fixture)", "volume": str(volume_path),
              "summary": summary, "arrays": arrays}
    (out / "public" / "fixtures.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    (out / "README.md").write_text(__doc__, encoding="utf-8")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--volume", default="mri/totalseg_mr.nii.gz", help="relative to ../shared/data")
    parser.add_argument("--labels", default="mri/totalseg_mr_labels.nii.gz")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(make(args.out, DATA / args.volume, DATA / args.labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
