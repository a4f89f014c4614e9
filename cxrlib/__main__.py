"""Command line: ``python -m cxrlib run --params params/demo.yaml [--stage 01_data_prep]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrlib.config import ParamsError, load_params, run_dir
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
    train = sub.add_parser("train-diffusion", help="train the DDPM (use under accelerate launch "
                           "for several GPUs); needs notebook 01's manifest for the run")
    train.add_argument("--params", type=Path, required=True)
    train.add_argument("--out", type=Path, default=None,
                       help="stage folder (default: <run>/02_diffusion)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.params)
            print(f"{args.params}: ok")
            return 0
        if args.command == "train-diffusion":
            return _train_diffusion(args.params, args.out)
        load_params(args.params)  # fail before any work on a bad file
        run_pipeline(args.params, tuple(args.stage or STAGES), force=args.force)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


def _train_diffusion(params_file: Path, out: Path | None) -> int:
    from cxrlib.data import load_cohort
    from cxrlib.diffusion import train_diffusion
    from cxrlib.imagecache import ImageCache

    params = load_params(params_file)
    folder = run_dir(params)
    cohort = load_cohort(params, folder)
    if cohort.cache_dir is None:
        raise SystemExit("a metadata-only run has no images to train on")
    result = train_diffusion(params, cohort.manifest, ImageCache(cohort.cache_dir),
                             out or folder / "02_diffusion")
    if result.is_main_process:
        print(f"processes: {result.num_processes}; steps {result.resumed_from} -> "
              f"{result.steps_done}; checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
