"""Build a JobSpec from a YAML file plus dotted-path overrides (what the CLI flags set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from api_schema import JobSpec
from scdd.errors import SpecError


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid job spec ({source}):"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"config file {path} must hold a mapping of spec sections, not a {type(data).__name__}")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(f"cannot set {dotted}: {key} is not a section")
        node = child
    node[leaf] = value


def build_spec(config: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> JobSpec:
    data = load_yaml(config) if config else {}
    for dotted, value in (overrides or {}).items():
        set_path(data, dotted, value)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, str(config) if config else "command-line flags")) from None
