"""The import rules of docs/architecture.md: api_schema is the leaf (pydantic only), imports point down, and the
command line (scdd_cli) sits on top of all layers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "api_schema": set(),
    "scdd": {"api_schema"},
    "workers": {"api_schema", "scdd"},
    "service": {"api_schema"},
    "scdd_cli": {"api_schema", "scdd", "workers", "service"},
}
OURS = set(ALLOWED)
# The one exemption: the Ray job of a service job runs the job driver, inside the cluster.
EXEMPT = {"service/entrypoint.py": {"workers"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_layers(package):
    for path in (ROOT / package).rglob("*.py"):
        allowed = ALLOWED[package] | {package} | EXEMPT.get(path.relative_to(ROOT).as_posix(), set())
        wrong = imported_packages(path) - allowed
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_api_schema_does_not_load_torch():
    code = "import sys, api_schema; api_schema.JobSpec(); assert 'torch' not in sys.modules, 'torch loaded'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_every_package_of_the_wheel_has_a_layer():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in include} == OURS
