"""Benchmark (not a test): SegVol's published inference code against ours, same volume, same weights, alternating.

What runs, each path in its own child process (so its peak RSS is its own, model included), alternating
official, ours, ours fp32, official, ... for ``--rounds N`` (medians are reported):

* official: the SegVol repository's own code (``--official-src``), as ``inference_demo.py`` runs it: its
  ``process_ct_gt`` preprocessing, then its ``zoom_in_zoom_out`` (zoom-out forward, ``logits2roi_coor``, its
  ``sliding_window_inference`` with the box reflected from the coarse mask), fp32, text + box. The re-prompt
  is all of that again (the official code keeps nothing between prompts) with one positive click added to the
  zoom-out call: its zoom-in forbids box and points together, so the zoom-in stays text + box (a wrapper passes
  the click to the model's first call only; the official functions run unchanged).
* ours: ``Predictor(model)`` (precision "auto": bf16 where the CPU has native bf16), ``read_volume`` +
  ``set_volume`` + the first prompt, then the re-prompt (the same + the click) on the same Predictor.
* ours fp32: the same with ``precision="fp32"``.

Both read the same NIfTI file and the same weights: the official SegVol built at the preset's widths with
``torch.manual_seed(0)`` random initialisation, its ``state_dict`` saved as safetensors (plain keys) and loaded
by the official model (``load_state_dict``, strict) and by ours (``weights.store.load_model``). Before timing,
the zoom-out logits of both models on the official zoom-out input are compared (max abs diff printed).
The prompts: text "liver" + the liver label's bounding box (the official demo derives it from the resized label,
ours gets the voxel box; both model-space boxes are printed); the click is the liver voxel nearest the liver's
centroid, given to the official model at the model-space position ours computes for it.

Ours runs with ``preprocessing="official"`` by default (voxel order as stored, as the official loader does): the
thorax CT is stored LAS, and the default "canonical" mode would mirror it to RAS before the model, so masks would
not be comparable voxel for voxel (``--ours-preprocessing canonical`` times that mode).

The official code is fetched, never committed: ``--official-src`` is a SegVol checkout or its bare git directory
(then ``git archive`` of ``--official-rev``), extracted into a temporary scratch folder and patched there at run
time by string replacements (each must match, or the run stops):

* ``.cuda()`` removed, ``torch.cuda.set_device`` and the ``cuda:N`` map location gone (CPU run);
* the CLIP text model built from the ``config.json`` in its ``config/clip`` folder (the folder the demo passes as
  ``clip_ckpt``; ``CLIPTextConfig.from_pretrained`` of a local folder, no download), eager attention, random
  weights until the checkpoint is loaded; the released code's ``CLIPTextConfig()`` has the same widths;
* MONAI 1.x keyword for the ViT patch embedding (``pos_embed=`` -> ``proj_type=``);
* ``LoadImage(image_only=False)``: the loader's (image, metadata) tuple the demo unpacks (newer MONAI changed the
  default), and ``ToNumpyd`` after ``Orientationd`` and after ``CropForegroundd``: MONAI 1.x transforms return
  MetaTensors where MONAI 0.9 returned numpy arrays, and the demo's own transforms fail on them (no ``.copy()``;
  ``ToTensord`` then keeps the cropped label non-contiguous, and its ``dice_score`` ``.view`` fails). The model
  calls get plain tensors (``as_tensor()`` in the harness's call wrapper), as under MONAI 0.9;
* imports that need torchvision (``SamPredictor``, ``SamAutomaticMaskGenerator``) or plotting (``draw_result``,
  ``pyplot`` in ``utils/loss.py``) dropped; none is used by inference;
* only with ``--preset tiny``: the hard-coded widths (ViT 768/3072/12/12, two-way transformer 2048/8, the
  ``Linear(512, 768)`` text projection and ``Linear(768, 96)`` text-to-mask projection) set to the tiny ones, and
  a CLIP config with the tiny text widths. These are the changes ``fixtures/segvol_parity/README.md`` section 8
  lists; ``ToNumpyd`` stands for the "array-type shim" its section 7 needed under MONAI 1.6.1.

Usage (with official widths one round takes about 25 minutes on 2 threads, most of it the official code; the
tiny smoke run takes 2-3 minutes)::

    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_official.py --preset tiny          # smoke, small CT
    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_official.py [--rounds 3] [--sizes 0.5 1.5] \\
        [--official-sizes 0.5] [--official-src /path/to/SegVol-or-bare-git-dir]
    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_official.py --smoke-encoder         # build + one window

``MEDSEGX_BENCH_PRESET=tiny`` is the same as ``--preset tiny``; ``MEDSEGX_SHARED`` points at another copy of the
shared folder; ``SEGVOL_OFFICIAL_SRC`` gives the default of ``--official-src``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import ROOT, SHARED, TOKENIZER, resampled_image  # noqa: E402  (shared benchmark helpers)

DATA = SHARED / "data"
FIXTURE_CONFIG = SHARED / "fixtures" / "segvol_parity" / "public" / "config.json"
DEFAULT_OFFICIAL_SRC = Path(os.environ.get("SEGVOL_OFFICIAL_SRC", ROOT.parent / ".mirror" / "BAAI-DCAI+SegVol"
                                           / "repo"))
VOLUMES = {  # preset -> default volume; its labels beside it (<name>_labels.nii.gz, ids named in <name>_labels.json or
            # the TotalSegmentator class map)
    "segvol": DATA / "ct" / "thorax_abdomen_ct.nii.gz",
    "tiny": DATA / "ct" / "totalseg_ct.nii.gz",
}
SPATIAL, PATCH = (32, 256, 256), (4, 16, 16)
OFFICIAL_WIDTHS = dict(embed_dim=768, mlp_dim=3072, num_layers=12, num_heads=12, decoder_depth=2,
                       decoder_heads=8, decoder_mlp_dim=2048, clip_hidden=512, clip_intermediate=2048,
                       clip_layers=12, clip_heads=8)


def preset_widths(preset: str) -> dict:
    if preset == "segvol":
        return dict(OFFICIAL_WIDTHS)
    if preset != "tiny":
        raise SystemExit(f"unknown preset {preset!r}: segvol (official widths) or tiny")
    config = json.loads(FIXTURE_CONFIG.read_text())
    vit, two_way, clip = config["image_encoder"], config["two_way_transformer"], config["text_encoder"]
    clip = clip["clip_text_config"]
    return dict(embed_dim=vit["hidden_size"], mlp_dim=vit["mlp_dim"], num_layers=vit["num_layers"],
                num_heads=vit["num_heads"], decoder_depth=two_way["depth"], decoder_heads=two_way["num_heads"],
                decoder_mlp_dim=two_way["mlp_dim"], clip_hidden=clip["hidden_size"],
                clip_intermediate=clip["intermediate_size"], clip_layers=clip["num_hidden_layers"],
                clip_heads=clip["num_attention_heads"])


# ---- the official code: fetched into a scratch folder, patched there ---------------------------------------------
def extract_official(source: Path, rev: str, dest: Path) -> str:
    """The official sources into ``dest`` (a bare git dir: ``git archive``; a checkout: a copy without .git);
    returns a description of what was taken."""
    source = source.expanduser().resolve()
    if (source / "HEAD").is_file() and (source / "objects").is_dir():   # a bare repository (the mirror)
        commit = subprocess.run(["git", "--git-dir", str(source), "rev-parse", rev], check=True,
                                capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "--git-dir", str(source), "archive", "--format=tar", commit],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        described = f"{source} @ {commit[:12]} (git archive)"
    elif (source / "inference_demo.py").is_file():
        shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        described = f"{source} (copy of the checkout)"
    else:
        raise SystemExit(f"--official-src {source}: neither a SegVol checkout (inference_demo.py) nor its bare git "
                         f"directory; fetch https://github.com/BAAI-DCAI/SegVol and point --official-src at it")
    for cache in list(dest.rglob("__pycache__")):   # the repository ships .pyc files: never let them stand in
        shutil.rmtree(cache)
    return described


def _replace(root: Path, relative: str, old: str, new: str, every: bool = False) -> None:
    path = root / relative
    text = path.read_text(encoding="utf-8")
    found = text.count(old)
    if found == 0 or (found > 1 and not every):
        raise SystemExit(f"patching the official code: {relative} holds {found} x {old!r} (expected "
                         f"{'some' if every else 'exactly one'}); another SegVol revision? use --official-rev "
                         f"5768c97")
    path.write_text(text.replace(old, new), encoding="utf-8")


def patch_official(root: Path, widths: dict) -> list:
    """Apply the run-time patches (module docstring) to the extracted sources; returns one line per patch."""
    done = []
    for relative in ("inference_demo.py", "network/model.py", "utils/monai_inferers_utils.py"):
        _replace(root, relative, ".cuda()", "", every=True)
    _replace(root, "inference_demo.py", "torch.cuda.set_device(gpu)", "pass  # bench: CPU")
    _replace(root, "inference_demo.py", "loc = 'cuda:{}'.format(gpu)", "loc = 'cpu'  # bench: CPU")
    done.append(".cuda() removed (inference_demo.py, network/model.py, utils/monai_inferers_utils.py); "
                "torch.cuda.set_device and the cuda map location gone")
    _replace(root, "network/model.py", "config = CLIPTextConfig()",
             "config = CLIPTextConfig.from_pretrained(clip_ckpt); config._attn_implementation = 'eager'")
    done.append("CLIP text model built from clip_ckpt/config.json (local, random weights), eager attention")
    _replace(root, "segment_anything_volumetric/build_sam.py", "pos_embed=pos_embed,", "proj_type=pos_embed,")
    done.append("MONAI 1.x ViT keyword: pos_embed= -> proj_type=")
    _replace(root, "data_process/demo_data_process.py", "transforms.LoadImage()",
             "transforms.LoadImage(image_only=False)")
    to_numpy = '            transforms.ToNumpyd(keys=["image", "label"]),  # bench: MONAI 1.x\n'
    for line in ('            transforms.Orientationd(keys=["image", "label"], axcodes="RAS"),\n',
                 '            transforms.CropForegroundd(keys=["image", "label"], source_key="image"),\n'):
        _replace(root, "data_process/demo_data_process.py", line, line + to_numpy)
    done.append("LoadImage(image_only=False) (the metadata tuple the demo unpacks); ToNumpyd after Orientationd and "
                "after CropForegroundd (MONAI 1.x transforms return MetaTensors, the demo's own transforms and "
                "its final ToTensord expect the numpy arrays MONAI 0.9 gave)")
    _replace(root, "segment_anything_volumetric/__init__.py", "from .predictor import SamPredictor\n", "")
    _replace(root, "segment_anything_volumetric/__init__.py",
             "from .automatic_mask_generator import SamAutomaticMaskGenerator\n", "")
    _replace(root, "inference_demo.py", "from utils.visualize import draw_result\n", "draw_result = None\n")
    _replace(root, "utils/loss.py", "from matplotlib import pyplot as plt\n", "")
    done.append("imports needing torchvision (SamPredictor, SamAutomaticMaskGenerator) or plotting (draw_result, "
                "pyplot) dropped")
    if widths != OFFICIAL_WIDTHS:
        build = "segment_anything_volumetric/build_sam.py"
        for old, new in (("embed_dim = 768,", f"embed_dim = {widths['embed_dim']},"),
                         ("mlp_dim = 3072", f"mlp_dim = {widths['mlp_dim']}"),
                         ("num_layers = 12", f"num_layers = {widths['num_layers']}"),
                         ("num_heads = 12", f"num_heads = {widths['num_heads']}"),
                         ("depth=2,", f"depth={widths['decoder_depth']},"),
                         ("mlp_dim=2048,", f"mlp_dim={widths['decoder_mlp_dim']},"),
                         ("num_heads=8,", f"num_heads={widths['decoder_heads']},")):
            _replace(root, build, old, new)
        _replace(root, "network/model.py", "nn.Linear(512, 768)",
                 f"nn.Linear(config.hidden_size, {widths['embed_dim']})")
        _replace(root, "segment_anything_volumetric/modeling/mask_decoder.py", "nn.Linear(768, 96)",
                 "nn.Linear(transformer_dim, transformer_dim // 8)")
        done.append(f"widths: {widths}")
    return done


def clip_folder(root: Path, widths: dict, scratch: Path) -> Path:
    """The folder the official TextEncoder gets as ``clip_ckpt``: the repository's own, or (other widths) a copy
    whose config.json has the preset's text widths."""
    folder = root / "config" / "clip"
    if widths == OFFICIAL_WIDTHS:
        return folder
    tiny = scratch / "clip_tiny"
    shutil.copytree(folder, tiny)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(hidden_size=widths["clip_hidden"], intermediate_size=widths["clip_intermediate"],
                                 num_hidden_layers=widths["clip_layers"], num_attention_heads=widths["clip_heads"])
    (tiny / "config.json").write_text(json.dumps(config, indent=1))
    return tiny


def import_official(root: str):
    """The patched official modules (the demo module pulls in model, preprocessing and inference utilities)."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, root)
    with contextlib.redirect_stdout(sys.stderr):
        import inference_demo
    return inference_demo


def official_args(clip_ckpt: str) -> argparse.Namespace:
    """inference_demo.py's arguments and the seg config its main() sets (visualisation off)."""
    return argparse.Namespace(test_mode=True, resume="", infer_overlap=0.5, spatial_size=SPATIAL,
                              patch_size=PATCH, work_dir="./work_dir", clip_ckpt=clip_ckpt, use_zoom_in=True,
                              use_text_prompt=True, use_box_prompt=True, use_point_prompt=False, visualize=False)


def build_official(demo, args):
    """The model as inference_demo.main() builds it (without the DataParallel wrapper: a pass-through on CPU)."""
    sam_model = demo.sam_model_registry["vit"](args=args)
    return demo.SegVol(image_encoder=sam_model.image_encoder, mask_decoder=sam_model.mask_decoder,
                       prompt_encoder=sam_model.prompt_encoder, clip_ckpt=args.clip_ckpt,
                       roi_size=args.spatial_size, patch_size=args.patch_size, test_mode=args.test_mode).eval()


# ---- timers -----------------------------------------------------------------------------------------------------
class CallTimer:
    """Times calls of the functions it wraps (nested wrapped calls count once, at the outermost level) and how
    many windows each call handled (``batch(*args)``)."""

    def __init__(self):
        self.calls, self.depth = [], 0

    def wrap(self, function, batch=lambda *args, **kwargs: 1):
        def timed(*args, **kwargs):
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.calls.append((time.perf_counter() - start, int(batch(*args, **kwargs))))
        return timed

    def take(self):
        """(per-window seconds, windows) of the calls since the last take."""
        calls, self.calls = self.calls, []
        return [seconds / n for seconds, n in calls for _ in range(n)], sum(n for _, n in calls)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# ---- the measured work, in child processes ----------------------------------------------------------------------
def official_to_input_grid(item, shape_kji) -> tuple:
    """Slices of the official cropped array on the input (k, j, i) grid: its loader transposes the stored
    (i, j, k) array to (k, j, i), pads each axis to the window (diff // 2 before), crops the foreground."""
    start = np.asarray(item["foreground_start_coord"]).astype(int)
    before = np.maximum(np.asarray(SPATIAL) - np.asarray(shape_kji), 0) // 2
    lo = start - before
    hi = lo + np.asarray(item["image"].shape[1:])
    if (lo < 0).any() or (hi > np.asarray(shape_kji)).any():
        raise RuntimeError(f"official crop {lo}..{hi} outside the volume {shape_kji}")
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def click_to_model(click_kji, crop: tuple, cropped_shape) -> np.ndarray:
    """A voxel click -> continuous zoom-out model coordinates, the mapping ours uses (``ZoomMaps.points_to_model``:
    crop voxel centres onto the resize's sample positions), so both models get the click at the same place."""
    local = np.asarray(click_kji, np.float64) - [s.start for s in crop]
    return (local + 0.5) * np.asarray(SPATIAL, np.float64) / np.asarray(cropped_shape, np.float64) - 0.5


class ClickOnZoomOut:
    """The model as zoom_in_zoom_out calls it, with ``click`` (or nothing) added to its first (zoom-out) call."""

    def __init__(self, model, click=None):
        self.model, self.click, self.first_boxes = model, click, None

    def __call__(self, image, text=None, boxes=None, points=None):
        if self.first_boxes is None:
            self.first_boxes = boxes
            points = self.click if self.click is not None else points
        # MONAI 1.x hands MetaTensors (per-op metadata overhead); MONAI 0.9, which the demo pins, plain tensors
        image, boxes = (t.as_tensor() if hasattr(t, "as_tensor") else t for t in (image, boxes))
        return self.model(image, text=text, boxes=boxes, points=points)


def worker_official(job: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    demo = import_official(job["scratch_src"])
    args = official_args(job["clip_ckpt"])
    start = time.perf_counter()
    model = build_official(demo, args)
    model.load_state_dict(load_file(job["weights"]), strict=True)
    build_s = time.perf_counter() - start
    encoder, decoder, scoring = CallTimer(), CallTimer(), CallTimer()
    model.image_encoder.forward = encoder.wrap(model.image_encoder.forward, lambda image: image.shape[0])
    model.forward_decoder = decoder.wrap(model.forward_decoder, lambda embedding, *a, **k: embedding.shape[0])
    demo.dice_score = scoring.wrap(demo.dice_score)   # zoom_in_zoom_out scores against the label: reported apart

    out = {"path": "official", "runtime": "cpu fp32", "build_s": build_s}
    categories = [job["structure"]]
    for phase in ("first", "reprompt"):
        with contextlib.redirect_stdout(sys.stderr):
            start = time.perf_counter()
            item = demo.process_ct_gt(job["volume"], job["labels_one"], categories, args.spatial_size)
            preprocess_s = time.perf_counter() - start
            crop = official_to_input_grid(item, job["shape_kji"])
            click = None
            if phase == "reprompt":
                point = click_to_model(job["click_kji"], crop, item["image"].shape[1:])
                click = (torch.tensor(point, dtype=torch.float32)[None, None], torch.ones(1, 1))
            # inference_single_ct's unpacking, then the official zoom_in_zoom_out itself
            image, gt3d = item["image"].float(), item["label"]
            image_zoom_out, gt3d_zoom_out = item["zoom_out_image"].float(), item["zoom_out_label"]
            calls = ClickOnZoomOut(model, click)
            record = demo.zoom_in_zoom_out(args, calls, image.unsqueeze(0), image_zoom_out.unsqueeze(0),
                                           gt3d.unsqueeze(0), gt3d_zoom_out.unsqueeze(0), categories=categories)
            total_s = time.perf_counter() - start
        encoder_s, encoded = encoder.take()
        decoder_s, decoded = decoder.take()
        scoring_s, _ = scoring.take()
        logits = record[job["structure"]][4]
        out.update({f"{phase}_s": total_s, f"{phase}_preprocess_s": preprocess_s, f"{phase}_dice_s": sum(scoring_s),
                    f"{phase}_encoder_s": encoder_s, f"{phase}_decoder_s": decoder_s,
                    f"{phase}_windows_encoded": encoded - 1, f"{phase}_windows_decoded": decoded - 1})
        if phase == "first":
            out["windows"] = encoded - 1
            out["model_box"] = [int(v) for v in calls.first_boxes.reshape(-1).tolist()]
            if job.get("mask_out"):
                mask = np.zeros(job["shape_kji"], np.uint8)
                mask[crop] = (torch.sigmoid(logits) > 0.5).numpy()
                np.save(job["mask_out"], mask)
        else:
            out["click_model"] = [round(float(v), 4) for v in point]
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def _ours_prompts(job: dict):
    from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts

    lo, hi = job["box_kji"][:3], job["box_kji"][3:]
    box = BoxPrompt(tuple(lo[::-1]), tuple(hi[::-1]), space="ijk")
    first = Prompts(text=job["structure"], box=box)
    return first, Prompts(text=job["structure"], box=box,
                          points=(PointPrompt(tuple(job["click_kji"][::-1]), space="ijk"),))


def worker_ours(job: dict) -> dict:
    from medsegx_core.data.readers import read_volume
    from medsegx_core.predictor import Predictor
    from medsegx_core.weights.store import load_model

    start = time.perf_counter()
    model = load_model(job["weights"], tokenizer=job["tokenizer"])
    out = {"path": "ours", "build_s": time.perf_counter() - start}
    first, second = _ours_prompts(job)
    start = time.perf_counter()
    volume = read_volume(job["volume"])
    read_s = time.perf_counter() - start
    predictor = Predictor(model, precision=job["precision"], preprocessing=job["preprocessing"])
    runner, encoder, decoder = predictor.runner, CallTimer(), CallTimer()
    runner.encode_image = encoder.wrap(runner.encode_image)
    runner.decode = decoder.wrap(runner.decode)
    if hasattr(runner, "encode_images"):   # batched variants, where the runner has them
        runner.encode_images = encoder.wrap(runner.encode_images, lambda images, *a, **k: len(images))
    if hasattr(runner, "decode_many"):
        runner.decode_many = decoder.wrap(runner.decode_many, lambda embeddings, *a, **k: embeddings.shape[0])
    predictor.set_volume(volume)
    set_volume_s = time.perf_counter() - start - read_s
    result = predictor.segment(first)
    out["first_s"] = time.perf_counter() - start
    out["first_encoder_s"], _ = encoder.take()
    out["first_decoder_s"], _ = decoder.take()
    start = time.perf_counter()
    again = predictor.segment(second)
    out["reprompt_s"] = time.perf_counter() - start
    out["reprompt_encoder_s"], timed_encoded = encoder.take()
    out["reprompt_decoder_s"], timed_decoded = decoder.take()
    out.update(read_s=read_s, set_volume_s=set_volume_s, runtime=result.runtime, windows=result.windows,
               reprompt_windows=again.windows,
               reprompt_windows_encoded=getattr(again, "windows_encoded", timed_encoded),
               reprompt_windows_decoded=getattr(again, "windows_decoded", timed_decoded),
               shape_kji=list(volume.array.shape))
    out["peak_rss_gb"] = _peak_rss_gb()
    if job.get("mask_out"):
        np.save(job["mask_out"], result.mask.astype(np.uint8))
        np.save(job["mask_out"].replace(".npy", "_reprompt.npy"), again.mask.astype(np.uint8))
    # The model-space box ours gave the zoom-out (answered from the caches filled above; not timed).
    try:
        out["model_box"] = [int(v) for v in predictor.zoom_out(predictor.map_prompts(first)).model_box]
    except Exception as exc:  # noqa: BLE001 - a report line, not a measurement
        out["model_box"] = f"not available ({exc})"
    return out


def make_weights(demo, args, path: str):
    """The official model at the patched widths, ``torch.manual_seed(0)`` default initialisation, its state_dict
    saved to ``path`` (safetensors, plain keys) and loaded back as the official children load it."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    start = time.perf_counter()
    official = build_official(demo, args)
    build_s = time.perf_counter() - start
    state = {name: tensor.detach().contiguous() for name, tensor in official.state_dict().items()}
    save_file(state, path)
    official.load_state_dict(load_file(path), strict=True)
    return official, build_s, state


def zoom_out_check(official, weights: str, tokenizer: str, image, text: str, box) -> dict:
    """Full-resolution zoom-out logits of the official model and of ours (fp32, loaded from ``weights``) on one
    model input (1, 1, 32, 256, 256) with text + box (1, 6): max abs difference and logit scale."""
    import torch

    from medsegx_core.predictor import Predictor
    from medsegx_core.weights.store import load_model

    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        reference = official(image, text=text, boxes=box)[0, 0].numpy()
    runner = Predictor(load_model(weights, tokenizer=tokenizer), precision="fp32", preprocessing="official").runner
    lowres = runner.decode(runner.encode_image(image[0, 0].numpy()), runner.encode_text(text), np.zeros((0, 3)),
                           np.zeros(0), box[0].numpy())
    logits = runner.upsample(lowres, SPATIAL)
    return {"zoom_out_max_abs_diff": float(np.abs(logits - reference).max()),
            "zoom_out_max_abs_logit": float(np.abs(reference).max())}


def worker_setup(job: dict) -> dict:
    """Random official weights (seed 0) saved as safetensors; both models' zoom-out logits on the official
    zoom-out input of the volume compared."""
    demo = import_official(job["scratch_src"])
    official, build_s, state = make_weights(demo, official_args(job["clip_ckpt"]), job["weights"])
    with contextlib.redirect_stdout(sys.stderr):
        item = demo.process_ct_gt(job["volume"], job["labels_one"], [job["structure"]], SPATIAL)
    image = item["zoom_out_image"].float().unsqueeze(0).as_tensor()
    box = demo.generate_box(item["zoom_out_label"][0]).unsqueeze(0).float()
    out = zoom_out_check(official, job["weights"], job["tokenizer"], image, job["structure"], box)
    return {**out, "build_s": build_s, "n_tensors": len(state), "box": [int(v) for v in box[0].tolist()],
            "n_parameters": int(sum(t.numel() for t in state.values() if t.is_floating_point()))}


def worker_smoke(job: dict) -> dict:
    """The official model at the preset's widths (random weights) and one encoder window, timed."""
    import torch

    demo = import_official(job["scratch_src"])
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_official(demo, official_args(job["clip_ckpt"]))
    build_s = time.perf_counter() - start
    image = torch.rand(1, 1, *SPATIAL)
    with torch.no_grad():
        start = time.perf_counter()
        embedding, _ = model.image_encoder(image)
        encoder_s = time.perf_counter() - start
    return {"build_s": build_s, "encoder_s": encoder_s, "embedding_shape": list(embedding.shape),
            "n_parameters": int(sum(p.numel() for p in model.parameters())), "peak_rss_gb": _peak_rss_gb()}


WORKERS = {"official": worker_official, "ours": worker_ours, "setup": worker_setup, "smoke": worker_smoke}


# ---- the driver ---------------------------------------------------------------------------------------------------
def run_child(kind: str, job: dict, threads: int, label: str) -> dict:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"  [{time.strftime('%H:%M:%S')}] {label}: load average {load} ...", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, __file__, "--worker", kind, "--job", json.dumps(job)],
                          capture_output=True, text=True, env=env, cwd=job.get("cwd"))
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def label_names(labels: Path) -> dict:
    beside = labels.with_name(labels.name.replace(".nii.gz", ".json"))
    if beside.is_file():
        return {name: int(key) for key, name in json.loads(beside.read_text()).items()}
    totalseg = json.loads((DATA / "totalsegmentator_class_map.json").read_text())["total"]
    return {name: int(key) for key, name in totalseg.items()}


def prepare_volume(volume: Path, labels: Path, structure: str, scale: float, scratch: Path) -> dict:
    """The volume file both paths read (resampled when ``scale`` != 1), a labels file holding only the structure
    (label 1, as the demo's one-category list expects), the structure's box and the click."""
    import SimpleITK as sitk

    names = label_names(labels)
    if structure not in names:
        raise SystemExit(f"{labels}: no label named {structure!r}")
    image = sitk.ReadImage(str(labels))
    one = sitk.Cast(sitk.BinaryThreshold(image, names[structure], names[structure], 1, 0), sitk.sitkUInt8)
    tag = f"x{scale:g}"
    if scale != 1.0:
        ct = resampled_image(sitk.ReadImage(str(volume)), scale)
        one = resampled_image(one, scale, interpolator=sitk.sitkNearestNeighbor, default=0, pixel=sitk.sitkUInt8)
        volume = scratch / f"volume_{tag}.nii.gz"
        sitk.WriteImage(ct, str(volume))
    labels_one = scratch / f"{structure}_{tag}.nii.gz"
    sitk.WriteImage(one, str(labels_one))
    mask = sitk.GetArrayFromImage(one).astype(bool)          # (k, j, i)
    if not mask.any():
        raise SystemExit(f"{labels}: {structure!r} is empty at scale {scale}")
    where = np.argwhere(mask)
    centroid = where.mean(axis=0)
    click = where[np.argmin(((where - centroid) ** 2).sum(axis=1))]
    return {"volume": str(volume), "labels_one": str(labels_one), "shape_kji": list(mask.shape),
            "box_kji": where.min(axis=0).tolist() + where.max(axis=0).tolist(), "click_kji": click.tolist()}


def _median(rows, key):
    return statistics.median(row[key] for row in rows)


def _spread(rows, key):
    values = [value for row in rows for value in row[key]]
    if not values:
        return "-", None
    median = statistics.median(values)
    return f"{median:.3f} ({min(values):.3f}-{max(values):.3f})", median


def print_table(official: list, ours: list, fp32: list) -> None:
    columns = [("official", official), (f"ours ({ours[0]['runtime']})", ours), (f"ours ({fp32[0]['runtime']})", fp32)]
    print(f"\n{'':34}" + "".join(f"{name:>26}" for name, _ in columns) + f"{'official:ours':>15}{'official:fp32':>15}")

    def row(label, cells):
        texts = [c[0] for c in cells]
        values = [c[1] for c in cells]
        ratios = [f"{values[0] / v:.1f}x" if values[0] is not None and v else "-" for v in values[1:]]
        print(f"{label:34}" + "".join(f"{t:>26}" for t in texts) + "".join(f"{r:>15}" for r in ratios))

    def seconds(rows, key):
        value = _median(rows, key)
        return f"{value:.2f}", value

    row("first prompt [s]", [seconds(rows, "first_s") for _, rows in columns])
    row("re-prompt, +1 click [s]", [seconds(rows, "reprompt_s") for _, rows in columns])
    row("encoder per window [s]", [_spread(rows, "first_encoder_s") for _, rows in columns])
    row("decoder per window [s]", [_spread(rows, "first_decoder_s") for _, rows in columns])
    row("windows re-encoded on re-prompt",
        [(f"{int(_median(rows, k))}", _median(rows, k)) for (_, rows), k in
         zip(columns, ("reprompt_windows_encoded",) * 3)])
    row("windows re-decoded on re-prompt",
        [(f"{int(_median(rows, k))}", _median(rows, k)) for (_, rows), k in
         zip(columns, ("reprompt_windows_decoded",) * 3)])
    row("peak RSS [GB]", [(f"{_median(rows, 'peak_rss_gb'):.2f}", _median(rows, "peak_rss_gb"))
                          for _, rows in columns])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=os.environ.get("MEDSEGX_BENCH_PRESET", "segvol"),
                        choices=["segvol", "tiny"], help="widths: segvol = official, tiny = the parity fixture's")
    parser.add_argument("--official-src", type=Path, default=DEFAULT_OFFICIAL_SRC,
                        help="SegVol checkout or its bare git directory (default: %(default)s)")
    parser.add_argument("--official-rev", default="HEAD", help="revision to git-archive from a bare directory")
    parser.add_argument("--volume", type=Path, help="CT to segment (default: thorax_abdomen_ct; tiny: totalseg_ct)")
    parser.add_argument("--labels", type=Path, help="its label map (default: <volume>_labels.nii.gz)")
    parser.add_argument("--structure", default="liver")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ours-preprocessing", default="official", choices=["official", "canonical"])
    parser.add_argument("--sizes", type=float, nargs="*", default=[0.5, 1.5],
                        help="extra scales of the volume for the growth table (ours)")
    parser.add_argument("--official-sizes", type=float, nargs="*", default=[],
                        help="extra scales for which the official code runs too (slow)")
    parser.add_argument("--smoke-encoder", action="store_true",
                        help="only build the official model and time one encoder window")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the patched sources and weights")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(WORKERS[args.worker](json.loads(args.job))))
        return

    import torch

    from medsegx_core.data.metrics import dice
    from medsegx_core.inference.device import cpu_has_native_bf16

    widths = preset_widths(args.preset)
    volume = args.volume or VOLUMES[args.preset]
    labels = args.labels or volume.with_name(volume.name.replace(".nii.gz", "_labels.nii.gz"))
    scratch = Path(tempfile.mkdtemp(prefix="bench_official_"))
    try:
        source = scratch / "segvol"
        source.mkdir()
        described = extract_official(args.official_src, args.official_rev, source)
        patches = patch_official(source, widths)
        base = {"scratch_src": str(source), "clip_ckpt": str(clip_folder(source, widths, scratch)),
                "tokenizer": str(TOKENIZER if TOKENIZER.is_dir() else source / "config" / "clip"),
                "weights": str(scratch / "segvol_seed0.safetensors"), "structure": args.structure,
                "cwd": str(scratch)}
        import monai
        import transformers

        print(f"torch {torch.__version__}, MONAI {monai.__version__}, transformers {transformers.__version__}; "
              f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
              f"{cpu_has_native_bf16()}, {os.cpu_count()} CPUs")
        print(f"official code: {described}, extracted to a scratch folder and patched there (not committed):")
        for line in patches:
            print(f"  - {line}")
        print(f"preset {args.preset!r}: {widths}")
        if args.smoke_encoder:
            out = run_child("smoke", base, args.threads, "official model construction + one encoder window")
            print(f"official model ({out['n_parameters'] / 1e6:.1f} M parameters) built in {out['build_s']:.1f} s; "
                  f"one encoder window {out['encoder_s']:.2f} s -> {out['embedding_shape']}; peak RSS "
                  f"{out['peak_rss_gb']:.2f} GB")
            return

        case = prepare_volume(volume, labels, args.structure, 1.0, scratch)
        print(f"volume {volume} (k, j, i) {tuple(case['shape_kji'])}; prompt: text {args.structure!r} + its box "
              f"(k, j, i) {case['box_kji']}; re-prompt: + one positive click at (k, j, i) {case['click_kji']}")
        setup = run_child("setup", {**base, **case}, args.threads, "weights (official model, seed 0) + check")
        print(f"weights: {setup['n_tensors']} tensors, {setup['n_parameters'] / 1e6:.1f} M parameters, official "
              f"model built in {setup['build_s']:.1f} s; zoom-out logits ours (fp32) vs official on the official "
              f"zoom-out input, text + box {setup['box']}: max abs diff {setup['zoom_out_max_abs_diff']:.2e} "
              f"(logits up to {setup['zoom_out_max_abs_logit']:.1f})")
        if setup["zoom_out_max_abs_diff"] > 1e-3 * max(1.0, setup["zoom_out_max_abs_logit"]):
            print("WARNING: the two models disagree on the same input: the comparison below is not like for like")

        jobs = {"official": ("official", {}), "ours": ("ours", {"precision": "auto"}),
                "fp32": ("ours", {"precision": "fp32"})}
        results = {name: [] for name in jobs}
        for round_index in range(args.rounds):
            for name, (kind, extra) in jobs.items():
                job = {**base, **case, **extra, "preprocessing": args.ours_preprocessing,
                       "mask_out": str(scratch / f"{name}_{round_index}.npy")}
                results[name].append(run_child(kind, job, args.threads, f"round {round_index + 1}: {name}"))
        official, ours, fp32 = results["official"], results["ours"], results["fp32"]
        masks = {name: np.load(scratch / f"{name}_0.npy") for name in jobs}
        print(f"\n== {volume.name} {tuple(case['shape_kji'])} (k, j, i), text {args.structure!r} + box, then + one "
              f"click; {official[0]['windows']} official / {ours[0]['windows']} ours zoom-in windows; "
              f"{args.rounds} round(s), medians; ours with preprocessing={args.ours_preprocessing!r}")
        print_table(official, ours, fp32)
        print(f"\nofficial: preprocessing (process_ct_gt, CT + label) {_median(official, 'first_preprocess_s'):.2f} s "
              f"and its Dice against the label (zoom_in_zoom_out computes two) {_median(official, 'first_dice_s'):.2f}"
              f" s of the first prompt; model build + load {_median(official, 'build_s'):.1f} s (not timed); its "
              f"decoder per window = forward_decoder (text encoder, prompt encoder, mask decoder, trilinear "
              f"upsample); on the re-prompt the click goes to the zoom-out only (the zoom-in stays text + box: "
              f"the official code forbids box + points there); click in model space {official[0]['click_model']}")
        print(f"ours: read {_median(ours, 'read_s'):.2f} s + set_volume {_median(ours, 'set_volume_s'):.2f} s "
              f"(bf16 column) of the first prompt; load {_median(ours, 'build_s'):.1f} s (not timed); decoder "
              f"per window = runner.decode (text embedding cached; upsample not included); re-prompt windows "
              f"{ours[0]['reprompt_windows']} (the click also goes to the zoom-in windows)")
        print(f"zoom-out box in model space: official {official[0]['model_box']}, ours {ours[0]['model_box']}"
              f"{'' if official[0]['model_box'] == ours[0]['model_box'] else '  (DIFFERENT)'}")
        print(f"mask Dice, first prompt: ours fp32 vs official {dice(masks['fp32'], masks['official']):.4f} "
              f"({int((masks['fp32'] != masks['official']).sum())} of {masks['fp32'].size} voxels differ); "
              f"ours {ours[0]['runtime']} vs ours fp32 {dice(masks['ours'], masks['fp32']):.4f}; re-prompt: ours "
              f"{ours[0]['runtime']} vs fp32 "
              f"{dice(np.load(scratch / 'ours_0_reprompt.npy'), np.load(scratch / 'fp32_0_reprompt.npy')):.4f}")

        scales = sorted(set(args.sizes) | set(args.official_sizes))
        if scales:
            print(f"\n== growth with volume size ({args.threads} threads; x1 from the table above)")
            print(f"{'scale':>6}{'shape (k, j, i)':>20}{'path':>10}{'windows':>9}{'first [s]':>11}"
                  f"{'re-prompt [s]':>15}{'peak RSS [GB]':>15}")

            def growth_row(scale, shape, name, row):
                print(f"{scale:>6g}{str(tuple(shape)):>20}{name:>10}{int(row['windows']):>9}{row['first_s']:>11.2f}"
                      f"{row['reprompt_s']:>15.2f}{row['peak_rss_gb']:>15.2f}", flush=True)

            for name, rows in (("official", official), ("ours", ours)):
                growth_row(1.0, case["shape_kji"], name, {key: _median(rows, key) for key in
                                                          ("windows", "first_s", "reprompt_s", "peak_rss_gb")})
            for scale in scales:
                scaled = prepare_volume(volume, labels, args.structure, scale, scratch)
                paths = (["official"] if scale in args.official_sizes else []) + (
                    ["ours"] if scale in args.sizes else [])
                for name in paths:
                    kind, extra = jobs[name]
                    job = {**base, **scaled, **extra, "preprocessing": args.ours_preprocessing}
                    growth_row(scale, scaled["shape_kji"], name,
                               run_child(kind, job, args.threads, f"x{scale:g}: {name}"))
    finally:
        if args.keep_scratch:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
