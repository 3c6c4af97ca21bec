"""The lock file installs what pyproject.toml asks for: every requirement (with the test and docs extras) is pinned in
requirements/cpu.lock at a version its specifier allows, and the lock pins constraints.txt's torch pair."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("test", "docs")  # what scripts/setup.sh installs besides the dependencies


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\[\],-]+)==([^\s;\\]+)", line)
        if match:
            pins[canonicalize_name(match.group(1).split("[")[0])] = match.group(2)
    return pins


def test_every_pyproject_requirement_is_pinned_in_the_lock_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins(ROOT / "requirements" / "cpu.lock")
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"] + [r for name in LOCKED_EXTRAS for r in extras[name]]]
    problems = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}{req.specifier} but the lock pins {pins[name]}")
    assert not problems, "; ".join(problems) + (
        " — regenerate: bash scripts/lock.sh")


TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.*)$")


def test_the_cuda_lock_pins_every_dependency_but_the_torch_stack_of_the_base_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins(ROOT / "requirements" / "cuda.lock")
    problems = []
    for req in map(Requirement, project["dependencies"]):
        name = canonicalize_name(req.name)
        if TORCH_STACK.match(name):
            continue
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}{req.specifier} but the lock pins {pins[name]}")
    assert not problems, "; ".join(problems) + " — regenerate: bash scripts/lock.sh"
    assert not [name for name in pins if TORCH_STACK.match(name)], "the base image provides the torch stack"
    assert "--hash=sha256:" in (ROOT / "requirements" / "cuda.lock").read_text()


def test_the_lock_pins_the_tested_torch_pair_and_hashes_every_package():
    pins = lock_pins(ROOT / "requirements" / "cpu.lock")
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            assert pins[canonicalize_name(name)] == version.strip()
    text = (ROOT / "requirements" / "cpu.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[-1])
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry)
