"""The README is a front page and docs/ the manual: the manual builds in MkDocs' strict mode (a broken link
or anchor, or a page left out of the nav, fails), its spec reference is what the code generates, and the
README's links and set-up commands hold."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_COMMANDS = ("bash scripts/setup.sh && .venv/bin/scdd distill",
                  "bash scripts/setup.sh && .venv/bin/python -m pytest -q")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_spec_docs", ROOT / "scripts" / "gen_spec_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _anchors(page: Path) -> set[str]:
    """The ids of a Markdown page's headings: explicit `{#id}` ones, else the toc extension's slug."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            explicit = re.search(r"\{#([^}\s]+)\}\s*$", line)
            title = re.sub(r"`", "", line.lstrip("#").strip())
            anchors.add(explicit.group(1) if explicit else slugify(title, "-"))
    return anchors


def test_spec_reference_page_is_generated_from_the_current_spec():
    page = ROOT / "docs" / "reference" / "spec.md"
    assert page.read_text() == _generator().render(), (
        "docs/reference/spec.md is stale: run .venv/bin/python scripts/gen_spec_docs.py")


def test_recipe_page_is_generated_from_the_current_recipes():
    spec = importlib.util.spec_from_file_location("gen_recipe_docs", ROOT / "scripts" / "gen_recipe_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "reference" / "recipes.md").read_text() == module.render(), (
        "docs/reference/recipes.md is stale: run .venv/bin/python scripts/gen_recipe_docs.py")


def test_benchmark_tables_are_rendered_from_the_result_files():
    """Every table of docs/benchmarks-and-findings.md inside a generated block is what its bench's `--table-from`
    prints for the committed result files it names (issue 28), and the speed and scaling tables are such blocks."""
    spec = importlib.util.spec_from_file_location("gen_bench_docs", ROOT / "scripts" / "gen_bench_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.PAGE.read_text()
    commands = [match["command"] for match in module.BLOCK.finditer(text)]
    for bench in ("recover_speed", "scaling"):
        assert any(f"bench/{bench}.py --table-from" in command for command in commands), bench
    for command in commands:
        for path in command.split()[3:]:
            assert (ROOT / path).is_file() or path.startswith("--"), f"{command}: {path} is not a committed result file"
    assert module.render(text) == text, (
        "docs/benchmarks-and-findings.md is stale: run .venv/bin/python scripts/gen_bench_docs.py")


def test_spec_reference_lists_every_field_with_its_default():
    from api_schema import JobSpec

    text = (ROOT / "docs" / "reference" / "spec.md").read_text()
    spec = JobSpec().to_dict()

    def leaves(data: dict, prefix: str = ""):
        for key, value in data.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    missing = [field for field in leaves(spec) if f"| `{field}` |" not in text]
    assert not missing, f"fields missing from the spec reference: {missing}"
    assert "| `recover.ipc` | integer in [1, 10000] | `10` | `--ipc` |" in text


def test_every_spec_field_has_a_description_for_the_reference():
    from api_schema import JobSpec

    schema = JobSpec.model_json_schema(by_alias=True)
    objects = {"JobSpec": schema, **schema["$defs"]}
    bare = [f"{model}.{name}" for model, node in objects.items() for name, field in node["properties"].items()
            if not field.get("description", "").strip()]
    assert not bare, f"spec fields without Field(description=...): {bare}"


def test_the_manual_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "cli-and-spec.html", "reference/spec.html", "images/demo-grid.png"):
        assert (site / page).is_file(), f"the site has no {page}"


def test_readme_is_a_front_page_with_the_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 150, "the README is a front page: the manual belongs in docs/"
    for command in SETUP_COMMANDS:
        assert f"```bash\n{command}\n```" in text, f"the README lost its set-up command {command!r}"


def test_readme_and_manual_links_stay_in_the_repository_and_resolve():
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    problems = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                problems.append(f"{page.relative_to(ROOT)} links outside the repository: {target}")
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{page.relative_to(ROOT)} links outside the repository: {target}")
            elif not resolved.exists():
                problems.append(f"{page.relative_to(ROOT)} links to a missing file: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{page.relative_to(ROOT)} links to a missing heading: {target}")
    assert not problems, "\n".join(problems)
