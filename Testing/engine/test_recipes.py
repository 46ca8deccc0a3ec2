"""Training recipes (training/recipes.py): a shipped recipe expands to exactly the options of the command that
trained the shipped weights, and a recipe that is wrong, or overridden on the command line, is refused."""
from __future__ import annotations

import json
import shlex

import pytest

from medsegx_core.errors import InputError
from medsegx_core.training.recipes import RECIPES_DIR, load_recipe
from medsegx_core.training.train_starter import build_parser, long_options, parse_args
from medsegx_core.weights.default import starter_weights_dir

# Options that say where a run happens; everything else is what the recipe decides.
WHERE = {"data", "bundle", "prepare", "out", "device", "workers", "threads", "init", "max_minutes",
         "checkpoint_every", "overwrite", "recipe", "recipe_record", "stop_after"}


def learning_options(args) -> dict:
    return {key: value for key, value in vars(args).items() if key not in WHERE}


def test_the_shipped_weights_were_trained_with_a_shipped_recipe():
    """The recorded command with the cases it really trained on (the record lists them; the default set has
    grown since) is what one of the shipped recipes says."""
    source = json.loads((starter_weights_dir() / "config.json").read_text())["source"]
    recorded = learning_options(parse_args(shlex.split(source["command"].split("train_starter", 1)[1])))
    recorded["cases"] = source["cases"]
    names = [p.stem for p in RECIPES_DIR.glob("*.json")]
    matching = []
    for name in names:
        options = learning_options(parse_args(["--recipe", name]))
        options["cases"] = options["cases"] or source["cases"]   # a recipe without cases: the default set
        if options == recorded:
            matching.append(name)
    assert matching, f"no shipped recipe ({', '.join(names)}) gives the options of: {source['command']}"


def test_every_shipped_recipe_expands_to_valid_options():
    for path in RECIPES_DIR.glob("*.json"):
        args = parse_args(["--recipe", path.stem])
        assert args.recipe_record["name"] == json.loads(path.read_text())["recipe"]
        assert args.steps > 0 and args.lr > 0


def test_a_recipe_is_recorded_with_its_hash_and_cannot_be_overridden(tmp_path):
    args = parse_args(["--recipe", "starter_stage8", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert args.recipe_record["file"] == "medsegx_core/resources/recipes/starter_stage8.json"
    assert len(args.recipe_record["sha256"]) == 64 and args.threads == 1
    with pytest.raises(InputError, match="set by the recipe"):
        parse_args(["--recipe", "starter_stage8", "--lr", "1e-3"])


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ({"recipe": "x", "version": 1, "trainer": "medsegx_core.training.train_starter"}, "missing: options"),
    ({"recipe": "x", "version": 1, "trainer": "another.trainer", "options": {}}, "is for another.trainer"),
    ({"recipe": "x", "version": 1, "trainer": "medsegx_core.training.train_starter", "options": {"out": "o"}},
     "belong on the command line"),
    ({"recipe": "x", "version": 1, "trainer": "medsegx_core.training.train_starter", "options": {"lrr": 1}},
     "unknown option"),
])
def test_bad_recipes_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "recipe.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    known = long_options(build_parser())
    with pytest.raises(InputError, match=message):
        load_recipe(str(path), "medsegx_core.training.train_starter", known)
    with pytest.raises(InputError, match="no shipped recipe"):
        load_recipe(str(tmp_path / "missing.json"), "medsegx_core.training.train_starter", known)
