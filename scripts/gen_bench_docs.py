"""Renders the benchmark tables of docs/benchmarks-and-findings.md from the benches' result files.

A generated block in the page names the command that renders it, a bench's `--table-from` over committed result
files; this script runs each command in-process and writes its output between the block's markers:

    <!-- generated: python bench/recover_speed.py --table-from bench/results/recover_speed-2026-12-07-bf16.json -->
    ...the table...
    <!-- end generated -->

    .venv/bin/python scripts/gen_bench_docs.py           # rewrite every block
    .venv/bin/python scripts/gen_bench_docs.py --check   # exit 1 when a block differs from its result files

tests/test_docs.py fails when the committed page differs from what this writes. Text between blocks is prose, kept
as it is: a number it cites must come from the same result files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks-and-findings.md"
BLOCK = re.compile(r"(<!-- generated: (?P<command>[^\n]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def run_bench(command: str) -> str:
    """stdout of `python bench/<name>.py <args>`, run in this process through the bench's `main(argv)`."""
    words = shlex.split(command)
    if len(words) < 2 or words[0] != "python" or not re.fullmatch(r"bench/\w+\.py", words[1]):
        raise SystemExit(f"a generated block's command must be `python bench/<name>.py ...`, not {command!r}")
    for path in (str(ROOT), str(ROOT / "bench")):
        if path not in sys.path:
            sys.path.insert(0, path)
    bench = importlib.import_module(Path(words[1]).stem)
    output = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(output):
        bench.main(words[2:])
    return output.getvalue()


def render(text: str) -> str:
    """`text` with every generated block rewritten from its command."""
    def block(match: re.Match) -> str:
        body = run_bench(match["command"]).strip("\n")
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page differs from what this writes")
    args = parser.parse_args()
    text = PAGE.read_text()
    rendered = render(text)
    if args.check:
        if rendered != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run .venv/bin/python scripts/gen_bench_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(rendered)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(BLOCK.findall(text))} generated blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
