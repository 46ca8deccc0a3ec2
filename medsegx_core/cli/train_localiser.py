"""``medsegx train-localiser --data ../shared/data -o FOLDER [--recipe R]``: the text localiser, trained here.

Encodes every labelled volume of the shared data with LiteMedSAM's frozen encoder (cached under ``--cache``, so a
second run trains at once), trains the localiser head with the recipe (default
``resources/recipes/text_localiser.json``; its held-out patients never reach training) and writes our weights
folder with the recipe, the seed, the training cases and a hash of their samples. Prints the coarse Dice of each
structure on the held-out patients' sampled slices (the end-to-end table: Testing/benchmarks/eval_text.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import InputError
    from ..training.localiser_data import VOCABULARY, all_cases, cached_cases
    from ..training.train_localiser import LocaliserRecipe, coarse_dice, samples_hash, train_localiser
    from ..weights.litemedsam import load_litemedsam
    from ..weights.hub import medsegx_home
    from ..weights.localiser import save_localiser
    from ._progress import progress_bar

    if not args.data.is_dir():
        raise InputError(f"--data {args.data}: not found; point it at the shared data folder (holding ct/ and mri/)")
    if args.output.exists() and not args.overwrite:
        raise InputError(f"-o {args.output}: already exists; choose another folder or pass --overwrite")
    recipe, recipe_record = LocaliserRecipe.from_file(args.recipe)
    cache = args.cache or medsegx_home() / "localiser_samples"
    if args.steps:
        recipe.steps = args.steps
    bar, update = progress_bar("encode")
    try:
        cases = cached_cases(args.data, cache, load_litemedsam(), all_cases(), VOCABULARY, progress=update,
                             variants=recipe.variants, held_out=recipe.held_out_patients)
    finally:
        bar.close()
    bar, update = progress_bar("train")
    try:
        localiser, log = train_localiser(cases, recipe, VOCABULARY, progress=update)
    finally:
        bar.close()
    training = [c for c in cases if c.patient not in recipe.held_out_patients]
    record = {"recipe": recipe.to_dict(), "recipe_file": Path(recipe_record["file"]).name,
              "recipe_record": recipe_record, "training_cases": log.cases,
              "samples_sha256": samples_hash(training), "training_seconds": round(log.seconds, 1),
              "final_loss": round(float(np.mean(log.losses[-50:])), 5), "torch": torch.__version__}
    save_localiser(args.output, localiser, record, overwrite=args.overwrite)
    print(f"wrote {args.output} ({log.seconds:.0f} s, final loss {record['final_loss']})")
    for case in cases:
        if case.patient in recipe.held_out_patients and "@" not in case.key:
            scores = coarse_dice(localiser, case)
            print(f"held out {case.key}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return 0


def register(subparsers) -> None:
    from ..training.train_localiser import DEFAULT_RECIPE

    parser = subparsers.add_parser("train-localiser", help="train the text localiser (text prompts on LiteMedSAM)",
                                   description=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (holding ct/ and mri/)")
    parser.add_argument("--cache", type=Path,
                        help="where the encoded slices are kept (default $MEDSEGX_HOME/localiser_samples)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"training recipe: a shipped name or a JSON file (default {DEFAULT_RECIPE})")
    parser.add_argument("-o", "--output", type=Path, required=True, help="weights folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument("--steps", type=int, help="replace the recipe's step count (a quick check)")
    parser.set_defaults(func=run)
