"""Training recipes (training/recipes.py), the two recipes of the one training loop: a shipped starter recipe expands
to exactly the options of the command that trained the shipped weights, fine-tuning's default recipe is what
``FinetuneSettings()`` holds, and a recipe that is wrong, or overridden on the command line, is refused."""
from __future__ import annotations

import json
import shlex
from dataclasses import replace

import pytest

from medsegx_core.cli import build_parser as medsegx_parser
from medsegx_core.cli.finetune import TRAINER as FINETUNE, add_learning_options, learning_options, settings_from_options
from medsegx_core.errors import InputError
from medsegx_core.training.finetune import FinetuneSettings
from medsegx_core.training.recipes import RECIPES_DIR, load_recipe, option_names
from medsegx_core.training.train_localiser import TRAINER as LOCALISER, LocaliserRecipe
from medsegx_core.training.train_starter import TRAINER as STARTER
from medsegx_core.training.train_starter import parse_args, recipe_options, upgrade_recorded_argv
from medsegx_core.weights.default import starter_weights_dir

# Options that say where a run happens; everything else is what the recipe decides.
WHERE = {"data", "bundle", "prepare", "out", "device", "workers", "threads", "init", "checkpoint_every", "resume",
         "overwrite", "recipe", "recipe_record", "stop_after"}


def learning_options_of(args) -> dict:
    return {key: value for key, value in vars(args).items() if key not in WHERE}


def recipes_for(trainer: str):
    return [p for p in sorted(RECIPES_DIR.glob("*.json")) if json.loads(p.read_text())["trainer"] == trainer]


def finetune_args(*extra):
    return medsegx_parser().parse_args(["finetune", "--base", "b", "--image", "i", "--label", "l", "-o", "o.st",
                                        *extra])


def test_the_shipped_weights_were_trained_with_a_shipped_recipe():
    """The recorded command (options renamed since read under their new names, e.g. --experts -> --with-experts)
    with the cases it really trained on (the record lists them; the default set has grown since) is what one of
    the shipped recipes says."""
    source = json.loads((starter_weights_dir() / "config.json").read_text())["source"]
    recorded_argv = upgrade_recorded_argv(shlex.split(source["command"].split("train_starter", 1)[1]))
    assert "--with-experts" in recorded_argv and "--experts" not in recorded_argv
    recorded = learning_options_of(parse_args(recorded_argv))
    recorded["cases"] = source["cases"]
    names = [p.stem for p in recipes_for(STARTER)]
    matching = []
    for name in names:
        options = learning_options_of(parse_args(["--recipe", name]))
        options["cases"] = options["cases"] or source["cases"]   # a recipe without cases: the default set
        if options == recorded:
            matching.append(name)
    assert matching == ["starter_stage7"], f"no shipped recipe ({', '.join(names)}) gives: {source['command']}"


def test_every_shipped_recipe_expands_to_valid_options():
    assert {json.loads(p.read_text())["trainer"] for p in RECIPES_DIR.glob("*.json")} == {STARTER, FINETUNE,
                                                                                         LOCALISER}
    for path in recipes_for(LOCALISER):
        recipe, record = LocaliserRecipe.from_file(path.stem)
        assert recipe.steps > 0 and recipe.learning_rate > 0 and record["name"] == json.loads(path.read_text())["recipe"]
    for path in recipes_for(STARTER):
        args = parse_args(["--recipe", path.stem])
        assert args.recipe_record["name"] == json.loads(path.read_text())["recipe"]
        assert args.steps > 0 and args.lr > 0
    for path in recipes_for(FINETUNE):
        options, record = learning_options(finetune_args("--recipe", path.stem))
        settings = settings_from_options(options, record)
        assert settings.steps > 0 and settings.lr > 0 and record["sha256"] and "overrides" not in record


def test_a_localiser_recipe_with_an_unknown_option_or_another_trainer_is_refused(tmp_path):
    shipped = json.loads((RECIPES_DIR / "text_localiser.json").read_text())
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**shipped, "options": {**shipped["options"], "stepz": 3}}))
    with pytest.raises(InputError, match="unknown option.*stepz"):
        LocaliserRecipe.from_file(wrong)
    wrong.write_text(json.dumps({**shipped, "trainer": FINETUNE}))
    with pytest.raises(InputError, match="is for medsegx finetune"):
        LocaliserRecipe.from_file(wrong)
    wrong.write_text(json.dumps({**shipped, "options": {**shipped["options"], "variants": ["native", "flipped"]}}))
    with pytest.raises(InputError, match="unknown variants flipped; known: native, coarse, labels"):
        LocaliserRecipe.from_file(wrong)


def test_finetunings_default_recipe_is_what_the_python_api_defaults_to():
    """``medsegx finetune`` without options and ``FinetuneSettings()`` (the Slicer module's) train alike."""
    options, record = learning_options(finetune_args())
    assert record["file"] == "medsegx_core/resources/recipes/finetune_experts.json" and "overrides" not in record
    assert settings_from_options(options, record) == replace(FinetuneSettings(trainable="experts"), recipe=record)


def test_finetune_options_replace_the_default_recipe_but_not_a_chosen_one(tmp_path):
    options, record = learning_options(finetune_args("--steps", "7", "--num-experts", "2"))
    settings = settings_from_options(options, record)
    assert settings.steps == 7 and settings.n_experts == 2 and settings.lr == FinetuneSettings().lr
    assert record["overrides"] == ["num-experts", "steps"]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"recipe": "mine", "version": 3, "trainer": FINETUNE, "options": {"steps": 9}}))
    options, record = learning_options(finetune_args("--recipe", str(mine), "--lr", "0.01"))
    assert (options["steps"], options["lr"], record["name"], record["overrides"]) == (9, 0.01, "mine", ["lr"])
    assert options["num_experts"] == 4                      # what a chosen recipe leaves out: the default's
    with pytest.raises(InputError, match="--steps set by the recipe mine.json"):
        learning_options(finetune_args("--recipe", str(mine), "--steps", "3"))
    mine.write_text(json.dumps({"recipe": "bad", "version": 1, "trainer": FINETUNE, "options": {"steps": "many"}}))
    with pytest.raises(InputError, match="invalid int value"):
        learning_options(finetune_args("--recipe", str(mine)))


def test_experts_keeps_one_meaning(capsys):
    """--experts names an expert pack (medsegx segment); finetune's number of experts is --num-experts."""
    with pytest.raises(SystemExit):
        finetune_args("--experts", "4")
    assert "--experts is now --num-experts" in capsys.readouterr().err
    assert finetune_args("--num-experts", "4").num_experts == 4


def test_a_recipe_is_recorded_with_its_hash_and_cannot_be_overridden(tmp_path):
    args = parse_args(["--recipe", "starter_stage8", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert args.recipe_record["file"] == "medsegx_core/resources/recipes/starter_stage8.json"
    assert len(args.recipe_record["sha256"]) == 64 and args.threads == 1 and args.with_experts
    with pytest.raises(InputError, match="set by the recipe"):
        parse_args(["--recipe", "starter_stage8", "--lr", "1e-3"])
    with pytest.raises(InputError, match="is for medsegx finetune"):
        parse_args(["--recipe", "finetune_experts"])


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ({"recipe": "x", "version": 1, "trainer": STARTER}, "missing: options"),
    ({"recipe": "x", "version": 1, "trainer": "another.trainer", "options": {}}, "is for another.trainer"),
    ({"recipe": "x", "version": 1, "trainer": STARTER, "options": {"out": "o"}}, "belong on the command line"),
    ({"recipe": "x", "version": 1, "trainer": STARTER, "options": {"lrr": 1}}, "unknown option"),
    ({"recipe": "x", "version": 1, "trainer": STARTER, "options": {"experts": True}}, "unknown option"),
])
def test_bad_recipes_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "recipe.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputError, match=message):
        load_recipe(str(path), STARTER, *recipe_options())
    with pytest.raises(InputError, match="no shipped recipe"):
        load_recipe(str(tmp_path / "missing.json"), STARTER, *recipe_options())


def test_both_commands_share_the_loop_options():
    """A recipe key of the loop (seed, steps, schedule, views, boxes) means the same in both commands."""
    shared = {"seed", "steps", "batch-size", "lr", "warmup", "zoom-in-share", "box-jitter"}
    assert shared <= set(option_names(add_learning_options)) and shared <= set(recipe_options()[0])


def test_every_bundled_expert_pack_records_the_shipped_recipe_that_made_it():
    """A bundled pack is reproducible: it names a shipped fine-tuning recipe whose file still has the recorded
    sha256, and the settings it was trained with are that recipe's (scored by fewshot_chaos.py or
    fewshot_litemedsam.py, which wrote it)."""
    import hashlib
    from dataclasses import asdict

    from medsegx_core.cli.finetune import settings_from_recipe
    from medsegx_core.weights.expert_pack import bundled_pack_list, read_pack_metadata

    packs = {f"{pack.base_model}/{pack.name}": pack.path for pack in bundled_pack_list()}
    assert packs, "the engine ships at least the abdominal_mr pack"
    for name, path in packs.items():
        extra = read_pack_metadata(path)["extra"]
        record = extra["recipe"]
        assert record is not None, f"bundled pack {name} was not made from a recipe"
        recipe_file = RECIPES_DIR.parents[2] / record["file"]
        assert hashlib.sha256(recipe_file.read_bytes()).hexdigest() == record["sha256"], (
            f"{record['file']} changed since it made {name}: a changed recipe is a new version and a new pack")
        expected = json.loads(json.dumps(asdict(replace(settings_from_recipe(str(recipe_file)), recipe=None))))
        assert extra["settings"] == expected
