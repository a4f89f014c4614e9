"""Command line: ``python -m cxrlib run --params params/demo.yaml [--stage 01_data_prep]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrlib.config import ParamsError, load_params
from cxrlib.pipeline import STAGES, run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxrlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks headless with papermill")
    run.add_argument("--params", type=Path, required=True, help="parameter file (params/*.yaml)")
    run.add_argument("--stage", action="append", choices=STAGES,
                     help="run only this stage (repeatable); default: all, in order")
    run.add_argument("--force", action="store_true", help="run stages already executed again")
    check = sub.add_parser("check", help="validate a parameter file and exit")
    check.add_argument("params", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.params)
            print(f"{args.params}: ok")
            return 0
        load_params(args.params)  # fail before any work on a bad file
        run_pipeline(args.params, tuple(args.stage or STAGES), force=args.force)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
