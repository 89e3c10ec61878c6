"""Recipes: one YAML file per profile and step, shipped in medlib/recipes/<profile>/<name>.yaml.

A recipe holds every setting of a step (model, data, hyperparameters, seeds, output dirs), in the
spirit of alignment-handbook recipes. `--set key.sub=value` overrides any existing key; an unknown
key is an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from medlib.paths import PACKAGE_DIR

RECIPE_DIR = PACKAGE_DIR / "recipes"
PROFILES = ("local", "paper")


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message names the file and key."""


def recipe_path(profile: str, name: str) -> Path:
    if profile not in PROFILES:
        raise RecipeError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    path = RECIPE_DIR / profile / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (RECIPE_DIR / profile).glob("*.yaml"))
        raise RecipeError(f"no recipe {name!r} for profile {profile!r} ({path}); known: {', '.join(known)}")
    return path


def load_recipe(profile: str, name: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load medlib/recipes/<profile>/<name>.yaml and apply `key.sub=value` overrides."""
    path = recipe_path(profile, name)
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: top level must be a mapping")
    recipe = apply_overrides(recipe, overrides, source=str(path))
    recipe.setdefault("_meta", {})
    recipe["_meta"].update({"recipe_file": f"{profile}/{name}.yaml", "overrides": list(overrides)})
    return recipe


def parse_value(text: str) -> Any:
    """YAML scalar parsing, so `--set training.max_steps=20` gives an int and `lr=3e-4` a float."""
    value = yaml.safe_load(text) if text != "" else ""
    # PyYAML reads 3e-4 as a string (YAML 1.1); accept it as a float as users expect.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(recipe: dict[str, Any], overrides: Iterable[str], source: str = "recipe") -> dict[str, Any]:
    out = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "<top>"
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a mapping)"
                raise RecipeError(f"unknown recipe key {key!r} in {source}: no {part!r} under {where}; known: {known}")
            if i == len(parts) - 1:
                node[part] = parse_value(raw)
            else:
                node = node[part]
    return out


def get(recipe: dict[str, Any], dotted: str, default: Any = ...) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is ...:
                raise RecipeError(f"recipe {recipe.get('_meta', {}).get('recipe_file', '?')} has no key {dotted!r}")
            return default
        node = node[part]
    return node


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; anything else is an error naming the file."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: top level must be a mapping")
    return data


PRESET_DIR = RECIPE_DIR / "presets"


def preset_overrides(preset: str | None, profile: str, step: str) -> list[str]:
    """`key=value` overrides of a size preset (medlib/recipes/presets/<name>.yaml) for one step
    (stage1, stage2, eval or chat). A preset belongs to one profile; any other is an error."""
    if not preset:
        return []
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise RecipeError(f"no preset {preset!r} ({path}); known: {', '.join(known)}")
    data = load_yaml(path)
    if data.get("profile") != profile:
        raise RecipeError(f"{path}: preset {preset!r} is for the {data.get('profile')!r} profile, not {profile!r}")
    values = data.get(step) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: {step!r} must be a mapping of recipe keys to values")
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def save_resolved(recipe: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), f, sort_keys=False)
    return path
