"""Where a benchmark writes its figures: results/local/ (not committed) unless --record
asks to replace the recorded results/<name>.json that the README quotes."""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_output_args(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument("--record", action="store_true",
                    help=f"replace the recorded results/{name}.json (default: results/local/{name}.json)")
    ap.add_argument("--output", default=None, help="write the figures to this file instead")


def output_path(args: argparse.Namespace, name: str) -> Path:
    if args.output:
        path = Path(args.output)
    else:
        path = RESULTS / f"{name}.json" if args.record else RESULTS / "local" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
