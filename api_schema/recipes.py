"""Named recipes: the reference scripts' values of SRe2L and SC-DD, one spec field `recipe` away.

Each recipe is a partial job spec (nested like the spec) that goes under the fields a spec sets: a field the spec
also gives overrides the recipe. `RECIPE_SOURCES` names, for every value, the reference file and line it comes
from (VILA-Lab/SRe2L; docs/recipes.md is generated from both).
"""

from __future__ import annotations

import copy
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {}

# recipe -> dotted field -> "file:line" in VILA-Lab/SRe2L
RECIPE_SOURCES: dict[str, dict[str, str]] = {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge_under(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (top's values win)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_under(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """The raw spec `data` with its recipe's values under it (the spec's own fields win). `validate` may be given
    by its alias `validate_`: the recipe's values go under whichever the spec uses."""
    name = data["recipe"]
    if name not in RECIPES:
        return data  # the field's own validation names the recipes there are
    recipe = copy.deepcopy(RECIPES[name])
    if "validate_" in data and "validate" in recipe:
        recipe["validate_"] = recipe.pop("validate")
    return _merge_under(recipe, data)


def _get(spec_dict: dict[str, Any], dotted: str) -> Any:
    value: Any = spec_dict
    for part in dotted.split("."):
        value = value[part]
    return value


def recipe_facts(name: str, spec_dict: dict[str, Any]) -> dict[str, Any]:
    """What the report records of a recipe: each dotted field it sets with its value where the job kept it, and the
    job's own value where the spec overrode it (`spec_dict`: the resolved spec, `JobSpec.to_dict`)."""
    kept, overridden = {}, {}
    for dotted, value in flatten(RECIPES[name]).items():
        actual = _get(spec_dict, dotted)
        same = list(actual) == list(value) if isinstance(value, (list, tuple)) and isinstance(actual, (list, tuple)) \
            else actual == value
        (kept if same else overridden)[dotted] = value if same else actual
    return {"name": name, "set": kept, "overridden": overridden}
