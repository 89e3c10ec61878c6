"""Typed recipes: every shipped recipe parses into its class; a wrong key or type is an error naming the
file, the key, the expected type and the value; no library code branches on a profile name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medlib import config
from medlib.config import RecipeError
from medlib.paths import PACKAGE_DIR

SHIPPED = [(profile, path.stem) for profile in config.PROFILES for path in sorted((config.RECIPE_DIR / profile).glob("*.yaml"))]


@pytest.mark.parametrize("profile,name", SHIPPED)
def test_every_shipped_recipe_parses_into_its_typed_class(profile, name):
    recipe = config.load_recipe(profile, name)
    assert isinstance(recipe, tuple(config.RECIPE_CLASSES.values())) and recipe.profile == profile
    assert recipe.meta.recipe_file == f"{profile}/{name}.yaml"
    with pytest.raises(Exception):  # frozen: a recipe is changed only through .replace()
        recipe.profile = "other"


def test_wrong_types_and_keys_name_the_file_key_expected_type_and_value():
    with pytest.raises(RecipeError, match=r"^local/stage1.yaml: training.max_steps must be an integer, got 'ten' \(set by training.max_steps=ten\)$"):
        config.load_train("local", 1, ["training.max_steps=ten"])
    with pytest.raises(RecipeError, match=r"local/stage2.yaml: data.replay.n_train must be an integer or a number or null, got 'many'"):
        config.load_train("local", 2, ["data.replay.n_train=many"])
    with pytest.raises(RecipeError, match=r"lora.use_rslora must be true or false, got 1"):
        config.load_train("local", 1, ["lora.use_rslora=1"])
    with pytest.raises(RecipeError, match=r"mcq.method must be one of 'loglik', 'generate', got 'vote'"):
        config.load_eval("local", ["mcq.method=vote"])
    with pytest.raises(RecipeError, match=r"unknown recipe key 'lora.rank'.*known: alpha, bias"):
        config.load_train("local", 1, ["lora.rank=8"])
    with pytest.raises(RecipeError, match="is a eval recipe, not a train recipe"):
        config.load_train("local", "eval")
    # a typed change in code is checked the same way
    recipe = config.load_train("local", 1)
    assert recipe.replace(seed=7).seed == 7 and recipe.seed == 3407
    with pytest.raises(RecipeError, match=r"replace\(\): TrainingSettings.learning_rate must be a number, got 'fast'"):
        recipe.training.replace(learning_rate="fast")
    with pytest.raises(RecipeError, match="has no field 'rank'"):
        recipe.lora.replace(rank=4)


def test_a_recipe_file_with_an_unknown_key_or_a_missing_one_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "local"
    folder.mkdir()
    text = (config.RECIPE_DIR / "local" / "stage1.yaml").read_text()
    (folder / "typo.yaml").write_text(text.replace("  learning_rate:", "  learnig_rate:"))
    (folder / "short.yaml").write_text(re.sub(r"^seed: .*\n", "", text, flags=re.M))
    monkeypatch.setattr(config, "RECIPE_DIR", tmp_path)
    with pytest.raises(RecipeError, match=r"local/typo.yaml: unknown key 'training.learnig_rate'; known under training: learning_rate"):
        config.load_recipe("local", "typo")
    with pytest.raises(RecipeError, match=r"local/short.yaml: missing key 'seed' \(an integer\)"):
        config.load_recipe("local", "short")


def test_the_resolved_recipe_round_trips(tmp_path):
    recipe = config.load_train("paper", 2, ["training.max_steps=7"], preset="colab_t4")
    path = config.save_resolved(recipe, tmp_path / "recipe.resolved.yaml")
    again = config.load_resolved(path)
    assert again == recipe and again.meta.overrides == recipe.meta.overrides and "training.max_steps=7" in again.meta.overrides


def test_no_library_code_branches_on_a_profile_name():
    offenders = []
    pattern = re.compile(r"""profile['"]?\]?\s*[!=]=|[!=]=\s*['"](local|paper)['"]""")
    for path in PACKAGE_DIR.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE_DIR)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_training_keys_are_sft_configs_own_and_sft_passes_any_other_through():
    """A new TRL argument needs no medlib code: the typed keys are SFTConfig's names, and training.sft passes the rest."""
    import dataclasses

    from trl import SFTConfig

    from medlib.config import MEDLIB_ONLY, TrainingSettings, load_train
    from medlib.training.arguments import sft_config, trainer_settings

    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    typed = {f.name for f in dataclasses.fields(TrainingSettings)} - set(MEDLIB_ONLY)
    assert typed <= sft_fields, typed - sft_fields
    recipe = load_train("local", 1, ["training.sft.max_grad_norm=0.25", "training.sft.neftune_noise_alpha=5"])
    settings, _ = trainer_settings(recipe, "hf", [])
    config = sft_config(settings, Path("/tmp/unused"), has_validation=True)
    assert config.max_grad_norm == 0.25 and config.neftune_noise_alpha == 5 and config.learning_rate == 3e-4
    with pytest.raises(RecipeError, match="training.sft.warp_speed is not an SFTConfig argument"):
        load_train("local", 1, ["training.sft.warp_speed=9"])
    with pytest.raises(RecipeError, match="set it as training.max_steps, its typed key"):
        load_train("local", 1, ["training.sft.max_steps=9"])


def test_one_override_list_reaches_each_recipe_by_its_sections():
    """The notebooks' `overrides`: one key=value list for a whole run; each recipe takes its own sections."""
    from medlib.config import check_overrides, overrides_for

    given = ["training.max_steps=4", "mcq.limit=6", "generation.max_new_tokens=12", "data.data_dir=/d", "max_steps=2"]
    assert overrides_for("train", given) == ["training.max_steps=4", "data.data_dir=/d"]
    assert overrides_for("eval", given) == ["mcq.limit=6", "data.data_dir=/d"]
    assert overrides_for("chat", given) == ["generation.max_new_tokens=12"]
    assert overrides_for("study", given) == ["mcq.limit=6", "max_steps=2"]
    assert check_overrides(given[:4], ("train", "eval", "chat")) == given[:4]
    with pytest.raises(RecipeError, match="override 'max_steps=2': no train or eval or chat recipe has a section 'max_steps'"):
        check_overrides(given, ("train", "eval", "chat"))
    with pytest.raises(RecipeError, match="must look like key.sub=value"):
        check_overrides(["training.max_steps"], ("train",))
    with pytest.raises(RecipeError, match="a list of key=value strings"):
        check_overrides("training.max_steps=4", ("train",))
    recipe = config.load_train("local", 1, overrides_for("train", given))
    assert recipe.training.max_steps == 4 and recipe.data.data_dir == "/d"
