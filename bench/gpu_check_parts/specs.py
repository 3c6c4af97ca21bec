"""Job-spec sections without pydantic: the defaults of api_schema's exported JSON schema, as attributes.

The lent GPU machine has torch and torchvision only, so the check cannot build api_schema's pydantic
models. The library's compute functions only read a spec's attributes, so a section's defaults read
from api_schema/job_spec.schema.json (generated from the models, checked for drift by
tests/test_service_api.py) stand in for it: a new field with a default reaches the check without an edit here.
Model validators do not run: fields they fill in (RecoverSpec's iterations, lr, r_bn) must be given.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SCHEMA = Path(__file__).resolve().parents[2] / "api_schema" / "job_spec.schema.json"


@lru_cache(maxsize=1)
def _definitions() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())["$defs"]


def _default(field: dict[str, Any]) -> Any:
    if "default" in field:
        value = field["default"]
        return tuple(value) if isinstance(value, list) else value
    ref = field.get("$ref")
    if ref is None:
        raise ValueError(f"schema field {field.get('title')!r} has neither a default nor a section")
    return section(ref.rsplit("/", 1)[-1])


def section(name: str, **overrides: Any) -> SimpleNamespace:
    """The spec section `name` (a model of api_schema, e.g. "RecoverSpec") at its defaults, with
    `overrides` replacing fields; a nested section is overridden by a dict of its fields."""
    schema = _definitions().get(name)
    if schema is None:
        raise ValueError(f"api_schema has no section {name!r}; choose one of: {', '.join(sorted(_definitions()))}")
    fields = schema["properties"]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{name} has no field(s) {', '.join(unknown)}")
    values = {key: _default(field) for key, field in fields.items()}
    for key, value in overrides.items():
        if isinstance(value, dict):
            nested = fields[key]["$ref"].rsplit("/", 1)[-1]
            value = section(nested, **value)
        values[key] = value
    return SimpleNamespace(**values)
