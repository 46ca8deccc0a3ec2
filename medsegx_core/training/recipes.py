"""Training recipes: a small versioned JSON file in the repository instead of a long command line.

Both commands of the one training loop take them: ``python -m medsegx_core.training.train_starter --recipe NAME``
(the base model) and ``medsegx finetune [--recipe NAME]`` (adapter experts; ``finetune_experts`` by default). A
recipe holds what decides the weights (seed, steps, schedule, augmentation, trainable set, held-out design); the
command line adds where the run happens (data, output, device, threads, workers). What is saved records the
recipe's path, name, version and sha256 (the starter's config.json, an expert pack's metadata), so a model card
can say exactly which file made it. Recipes live in ``medsegx_core/resources/recipes/``::

    {"recipe": "starter-stage8", "version": 2, "trainer": "medsegx_core.training.train_starter",
     "description": "...", "init": "what the run continues from",
     "options": {"seed": 8, "steps": 1800, "lr": 0.0003, "with-experts": true, "exclude-patient": ["ct-patient-4"]}}

``options`` are the command's own long options without their dashes: ``true`` is a flag, a list is a multi-valued
option. A recipe named on the command line is the record: its options cannot also be given there. A command's
default recipe (finetune's) is only its defaults: options given on the command line replace them, and the record
lists them as ``overrides``. The options the two commands share (``add_loop_options``) have one name in both.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

from ..errors import InputError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "resources" / "recipes"


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    version: int
    trainer: str
    options: Dict[str, Any]
    sha256: str

    def argv(self) -> List[str]:
        """The options as command-line tokens (``--lr 0.0003``, ``--with-experts``, ``--exclude-patient a b``)."""
        tokens: List[str] = []
        for key, value in self.options.items():
            if value is False or value is None:
                continue
            tokens.append(f"--{key}")
            if value is True:
                continue
            tokens.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        return tokens

    def record(self, overrides: Sequence[str] = ()) -> Dict[str, Any]:
        """What the trained weights keep of the recipe (config.json "source", an expert pack's metadata)."""
        try:
            shown = str(self.path.relative_to(RECIPES_DIR.parents[2]))
        except ValueError:
            shown = str(self.path)
        record = {"file": shown, "name": self.name, "version": self.version, "sha256": self.sha256}
        if overrides:
            record["overrides"] = sorted(overrides)
        return record


def find_recipe(name_or_path: str) -> Path:
    """A recipe file by path, or by name among the shipped recipes (``starter_stage8`` or ``starter_stage8.json``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json"))) or "none"
    raise InputError(f"recipe {name_or_path}: no such file, and no shipped recipe of that name (shipped: {known})")


def load_recipe(name_or_path: str, trainer: str, options: Sequence[str], run_options: Sequence[str] = ()) -> Recipe:
    """Read and check a recipe for ``trainer``: its option names must be among ``options`` (what a recipe may
    set); ``run_options`` are the command's options that say where a run happens (refused with that reason)."""
    path = find_recipe(name_or_path)
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"recipe {path}: not valid JSON ({exc})")
    missing = [key for key in ("recipe", "version", "trainer", "options") if key not in data]
    if missing or not isinstance(data.get("options"), dict):
        raise InputError(f"recipe {path}: needs the keys recipe, version, trainer and an options object "
                         f"(missing: {', '.join(missing) or 'options is not an object'})")
    if data["trainer"] != trainer:
        raise InputError(f"recipe {path} is for {data['trainer']}, not {trainer}")
    given = data["options"]
    run_only = sorted(set(given) & set(run_options))
    unknown = sorted(set(given) - set(options) - set(run_options))
    if run_only:
        raise InputError(f"recipe {path}: {', '.join(run_only)} belong on the command line (they say where the run "
                         f"happens, not what it learns)")
    if unknown:
        raise InputError(f"recipe {path}: unknown option(s) {', '.join(unknown)}")
    return Recipe(path.resolve(), str(data["recipe"]), int(data["version"]), trainer, given,
                  hashlib.sha256(raw).hexdigest())


def command_line_conflicts(recipe: Recipe, argv: Sequence[str]) -> List[str]:
    """Options given on the command line that the recipe already sets."""
    given = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
    return sorted(given & set(recipe.options))


class _RecipeParser(argparse.ArgumentParser):
    """Parses a recipe's options as the command line would (types, choices), failing with the recipe's name."""

    def __init__(self, recipe: Recipe):
        super().__init__(prog=f"recipe {recipe.path}", add_help=False, allow_abbrev=False)
        self.recipe = recipe

    def error(self, message: str):
        raise InputError(f"recipe {self.recipe.path}: {message}")


def recipe_values(recipe: Recipe, add_options: Callable[[argparse.ArgumentParser], None]) -> Dict[str, Any]:
    """{dest: value} of the options the recipe sets, converted and checked by the options' own parser
    (``add_options(parser)`` adds them with ``argparse.SUPPRESS`` defaults)."""
    parser = _RecipeParser(recipe)
    add_options(parser)
    return vars(parser.parse_args(recipe.argv()))


def option_names(add_options: Callable[[argparse.ArgumentParser], None]) -> List[str]:
    """The long option names (no dashes) that ``add_options`` adds."""
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    return [o[2:] for action in parser._actions for o in action.option_strings if o.startswith("--")]


def add_loop_options(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """The options both training commands share (one loop, one sampler), under one name in both, so a recipe key
    means the same thing in either. ``defaults``: {dest: value}; an absent one defaults to ``argparse.SUPPRESS``
    (not given: the recipe's value)."""
    def default(dest):
        return defaults.get(dest, argparse.SUPPRESS)

    parser.add_argument("--seed", type=int, default=default("seed"),
                        help="seeds the initialisation, every sample and every dropout draw")
    parser.add_argument("--steps", type=int, default=default("steps"), help="optimiser steps (the schedule's span)")
    parser.add_argument("--batch-size", type=int, default=default("batch_size"),
                        help="global batch (all processes together)")
    parser.add_argument("--lr", type=float, default=default("lr"), help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=default("warmup"),
                        help="linear warm-up steps before the cosine decay")
    parser.add_argument("--zoom-in-share", type=float, default=default("zoom_in_share"),
                        help="share of samples drawn as native-resolution zoom-in windows (the rest are zoom-out "
                             "views of the whole crop)")
    parser.add_argument("--box-jitter", type=int, default=default("box_jitter"),
                        help="voxels each side of a simulated box may move outwards")


class RenamedOption(argparse.Action):
    """An option that was renamed: any use ends with argparse's usage error naming its new form (``--experts`` had three
    meanings across the commands; only ``medsegx segment``'s, an expert pack, kept the name)."""

    def __init__(self, option_strings, dest, new_name: str = "", meaning: str = "", **kwargs):
        kwargs.setdefault("nargs", "?")
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new_name, self.meaning = new_name, meaning

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new_name} ({self.meaning}); {option_string} names an expert "
                     f"pack only in 'medsegx segment' and the batch script")
