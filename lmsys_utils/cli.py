"""Command line: python -m lmsys_utils {demo,check-data,...}. Errors are one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys


def cmd_check_data(args) -> int:
    from .data import load_arena

    _, summary = load_arena(args.path, drop_invalid=args.drop_invalid)
    print(summary)
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from .data import load_arena
    from .demo import write_demo_data

    out = Path(args.out)
    train_path, test_path = (Path(args.data), None) if args.data else write_demo_data(out / "data")
    _, summary = load_arena(train_path)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmsys_utils", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-data", help="validate a competition-format CSV and print what it holds",
                       description="Read a train.csv/test.csv the way training does and print a summary: rows "
                                   "kept and dropped, labels, multi-turn rows, null turns, repairs. "
                                   "Exits 1 on invalid input, naming file, row, id and column.")
    p.add_argument("path", help="the CSV to check, e.g. /kaggle/input/lmsys-chatbot-arena/train.csv")
    p.add_argument("--drop-invalid", action="store_true", help="drop invalid rows and report their ids")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("demo", help="the main job on the project's own synthetic data (no download)",
                       description="Make synthetic demo data, validate it, and run the pipeline on it.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data", help="use this competition-format train CSV instead of the demo data")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import ArenaDataError

    try:
        return args.func(args)
    except (ArenaDataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
