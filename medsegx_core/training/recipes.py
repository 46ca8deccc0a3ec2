"""Training recipes: a small versioned JSON file in the repository instead of a long command line.

A recipe holds what decides the weights (seed, steps, schedule, augmentation, held-out design); the command line
adds only where the run happens (data folder or prepared set, output folder, device, threads, workers). The
shipped weights record the recipe's path, name, version and sha256 in their config.json, so a model card can say
exactly which file made them. Recipes live in ``medsegx_core/resources/recipes/``::

    {"recipe": "starter-stage8", "version": 1, "trainer": "medsegx_core.training.train_starter",
     "description": "...", "init": "what the run continues from",
     "options": {"seed": 8, "steps": 1800, "lr": 0.0003, "experts": true, "exclude-patient": ["ct-patient-4"]}}

``options`` are the trainer's own long options without their dashes: ``true`` is a flag, a list is a
multi-valued option. An option the recipe sets cannot also be given on the command line (the file is the record).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..errors import InputError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "resources" / "recipes"
# Where and how a run happens, not what it learns: given on the command line, never in a recipe.
RUN_OPTIONS = ("data", "bundle", "prepare", "out", "device", "workers", "threads", "init", "max-minutes",
               "checkpoint-every", "overwrite", "recipe")


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    version: int
    trainer: str
    options: Dict[str, Any]
    sha256: str

    def argv(self) -> List[str]:
        """The options as command-line tokens (``--lr 0.0003``, ``--experts``, ``--exclude-patient a b``)."""
        tokens: List[str] = []
        for key, value in self.options.items():
            if value is False or value is None:
                continue
            tokens.append(f"--{key}")
            if value is True:
                continue
            tokens.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        return tokens

    def record(self) -> Dict[str, Any]:
        """What the trained weights keep of the recipe (config.json "source")."""
        try:
            shown = str(self.path.relative_to(RECIPES_DIR.parents[2]))
        except ValueError:
            shown = str(self.path)
        return {"file": shown, "name": self.name, "version": self.version, "sha256": self.sha256}


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


def load_recipe(name_or_path: str, trainer: str, known_options: Sequence[str]) -> Recipe:
    """Read and check a recipe for ``trainer`` whose option names must be among ``known_options``."""
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
    options = data["options"]
    run_only = sorted(set(options) & set(RUN_OPTIONS))
    unknown = sorted(set(options) - set(known_options))
    if run_only:
        raise InputError(f"recipe {path}: {', '.join(run_only)} belong on the command line (they say where the run "
                         f"happens, not what it learns)")
    if unknown:
        raise InputError(f"recipe {path}: unknown option(s) {', '.join(unknown)}")
    return Recipe(path.resolve(), str(data["recipe"]), int(data["version"]), trainer, options,
                  hashlib.sha256(raw).hexdigest())


def command_line_conflicts(recipe: Recipe, argv: Sequence[str]) -> List[str]:
    """Options given on the command line that the recipe already sets."""
    given = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
    return sorted(given & set(recipe.options))
