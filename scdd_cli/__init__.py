"""The `scdd` command line: the one entry point, above all layers (DESIGN.md).

Each layer owns its subcommands and this module only composes them: `distill` from the library
(scdd/cli.py), which hands `--workers N` and `--events` runs to the Ray job driver (workers/cli.py),
and `serve` plus the client commands from the job service (service/cli.py). What a command needs
beyond its parser is imported when it runs, so `scdd --help` and the client commands load no torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import scdd
from scdd.cli import add_distill
from scdd.relabel_cli import add_relabel
from scdd.evaluate_cli import add_evaluate
from service.cli import add_client, add_serve
from workers.cli import distill_on_ray


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scdd", description="Dataset distillation: SC-DD and SRe2L.")
    parser.add_argument("--version", action="version", version=f"scdd {scdd.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_distill(sub, run_on_ray=distill_on_ray)
    add_relabel(sub)
    add_evaluate(sub, run_on_ray=distill_on_ray)
    add_client(sub)
    add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("scdd: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
