"""Command line: ``python -m cxrlib run --params params/demo.yaml [--stage 01_data_prep]``;
``python -m cxrlib verify --params params/demo.yaml`` checks a run against its records;
``--cluster params/cluster/slurm.yaml`` runs a stage's pieces as SLURM jobs, ``plan`` says
what a study will cost first, ``cancel`` ends a run's jobs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cxrlib.cluster.spec import CLUSTER_ENV, load_cluster
from cxrlib.core.config import load_params, parse_overrides
from cxrlib.core.errors import ParamsError
from cxrlib.core.layout import STAGES, RunLayout
from cxrlib.core.records import writing
from cxrlib.core.schema import Params
from cxrlib.notebook_runner import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxrlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks headless with papermill")
    run.add_argument("--params", type=Path, required=True, help="parameter file (params/*.yaml)")
    run.add_argument("--stage", action="append", choices=STAGES,
                     help="run only this stage (repeatable); default: all, in order")
    run.add_argument("--force", action="store_true", help="run stages already executed again")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted key of the parameter file for every stage "
                     "(repeatable; VALUE is YAML), e.g. --set run.name=demo-sde "
                     "--set sampling.sampler=sde_dpmpp")
    run.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output "
                     "(messages, progress bars); show papermill's cell counter only")
    check = sub.add_parser("check", help="validate a parameter file and exit")
    arm = sub.add_parser("run-arm", help="train one arm of the classifier grid (resumable); "
                         "refused while another process writes the run, unless it delegated "
                         "this arm to this job")
    arm.add_argument("--params", type=Path, required=True)
    arm.add_argument("--arm", required=True, help="the experiment's name, e.g. real_only.f25 "
                     "(`cxrlib plan` lists them)")
    arm.add_argument("--seed", type=int, required=True)
    arm.add_argument("--threads", type=int, help="torch threads (default: torch's own); "
                     "a cluster task uses its cpus_per_task")
    cancel = sub.add_parser("cancel", help="cancel the SLURM jobs a run's stage delegated "
                            "(a waiting submitter stops)")
    cancel.add_argument("--params", type=Path, required=True)
    plan = sub.add_parser("plan", help="print the jobs each stage would submit and an "
                          "estimate of GPU-hours and disk, before submitting anything")
    plan.add_argument("--params", type=Path, required=True)
    plan.add_argument("--gpu", help="the GPU kind to price (default: the cluster file's "
                      "gpu_kind)")
    check.add_argument("params", type=Path)
    train = sub.add_parser("train-diffusion", help="train the DDPM (use under accelerate launch "
                           "for several GPUs); needs notebook 01's manifest for the run")
    train.add_argument("--params", type=Path, required=True)
    synth = sub.add_parser("generate-synthetic", help="generate the synthetic cohorts (use under "
                           "accelerate launch to split across GPUs); needs notebook 02's model")
    synth.add_argument("--params", type=Path, required=True)
    synth.add_argument("--generator", type=Path, help="sample from this exported generator "
                       "folder (export-generator) instead of the run's latest checkpoint")
    export = sub.add_parser("export-generator", help="write the run's generator as a diffusers "
                            "pipeline folder with a model card (DiffusionPipeline."
                            "from_pretrained(DIR, trust_remote_code=True) loads it)")
    export.add_argument("--params", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True, help="folder to write (replaced)")
    grid = sub.add_parser("run-experiments", help="train the classifier experiment grid (use "
                          "under accelerate launch for several GPUs); needs notebook 03's "
                          "synthetic cohorts")
    grid.add_argument("--params", type=Path, required=True)
    verify = sub.add_parser("verify", help="check a run's files against what each stage "
                            "recorded when it finished; names what is missing, truncated or "
                            "changed, and the stage to run again (exit 1 if anything is)")
    verify.add_argument("--params", type=Path, required=True)
    verify.add_argument("--quick", action="store_true", help="sizes, and checksums only of "
                        "files whose modification time changed (the check a stage makes of "
                        "its inputs); default: every checksum")
    for command in (run, train, synth, grid, plan):
        command.add_argument("--cluster", type=Path, help="cluster file (params/cluster/"
                             "slurm.yaml): run the stage's pieces as SLURM jobs")
    args = parser.parse_args(argv)
    try:
        if getattr(args, "cluster", None) is not None:
            load_cluster(args.cluster)  # fail before any work on a bad file
            os.environ[CLUSTER_ENV] = str(args.cluster.resolve())  # the kernels inherit it
        if args.command == "check":
            _weights_at_hand(load_params(args.params))
            print(f"{args.params}: ok")
            return 0
        if args.command == "train-diffusion":
            return _train_diffusion(args.params)
        if args.command == "generate-synthetic":
            return _generate_synthetic(args.params, args.generator)
        if args.command == "export-generator":
            return _export_generator(args.params, args.out)
        if args.command == "run-experiments":
            return _run_experiments(args.params)
        if args.command == "run-arm":
            return _run_arm(args.params, args.arm, args.seed, args.threads)
        if args.command == "cancel":
            return _cancel(args.params)
        if args.command == "plan":
            return _plan(args.params, args.cluster, args.gpu)
        if args.command == "verify":
            return _verify(args.params, full=not args.quick)
        overrides = parse_overrides(args.set)
        _weights_at_hand(load_params(args.params, overrides))  # fail before any work
        run_pipeline(args.params, tuple(args.stage or STAGES), force=args.force,
                     quiet=args.quiet, overrides=overrides or None)
    except (ParamsError, ValueError, RuntimeError, FileNotFoundError, KeyError) as err:
        # DataError, CohortError, DiffusionError and SyntheticCohortError subclass these: one line,
        # not a traceback, for the errors cxrlib raises about the user's data and parameters.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _weights_at_hand(params: Params) -> None:
    """Pretrained classifier weights the parameters name must be on this machine: an error
    with the command that fetches them now, not when notebook 01 first builds a model."""
    if params.classifier.pretrained:
        from cxrlib.classifier.training import pretrained_weights

        pretrained_weights(params.classifier)


def _train_diffusion(params_file: Path) -> int:
    from cxrlib.data.imagecache import ImageCache
    from cxrlib.data.readers import load_cohort
    from cxrlib.diffusion.training import train_diffusion

    params = load_params(params_file)
    run = RunLayout.open(params)
    with writing(run, "02_diffusion_training"):
        cohort = load_cohort(params, run)
        if cohort.cache_dir is None:
            raise SystemExit("a metadata-only run has no images to train on")
        result = train_diffusion(params, cohort.manifest, ImageCache(cohort.cache_dir), run)
    if result.is_main_process:
        print(f"processes: {result.num_processes}; steps {result.resumed_from} -> "
              f"{result.steps_done}; checkpoint {result.checkpoint}")
    return 0


def _generate_synthetic(params_file: Path, exported: Path | None) -> int:
    from cxrlib.data.readers import load_cohort
    from cxrlib.diffusion.checkpoints import sampling_checkpoint
    from cxrlib.diffusion.pipeline import CXRPipeline
    from cxrlib.synthetic.cohorts import build_setting_cohorts, build_synthetic_cohort

    params = load_params(params_file)
    run = RunLayout.open(params)
    with writing(run, "03_sampling_explorer"):
        cohort = load_cohort(params, run)
        generator = (CXRPipeline.from_exported(exported) if exported is not None
                     else CXRPipeline.from_checkpoint(sampling_checkpoint(run, params),
                                                      params.diffusion))
        for strategy in params.sampling.strategies:
            synth = build_synthetic_cohort(params, cohort.manifest, generator, run, strategy)
            print(f"{strategy}: {len(synth)} synthetic images")
        for setting, synth in build_setting_cohorts(params, cohort.manifest, run).items():
            print(f"{setting.label}: {len(synth)} synthetic images")
    return 0


def _export_generator(params_file: Path, out: Path) -> int:
    from cxrlib.diffusion.export import export_generator

    folder = export_generator(load_params(params_file), out)
    print(f"generator written to {folder}; load it with DiffusionPipeline.from_pretrained("
          f"{str(folder)!r}, trust_remote_code=True)")
    return 0


def _run_experiments(params_file: Path) -> int:
    from cxrlib.experiments.runner import grid_data, run_grid

    params = load_params(params_file)
    run = RunLayout.open(params)
    with writing(run, "04_classifier_experiments"):
        results = run_grid(params, grid_data(params, run), run)
    print(f"{len(results)} experiment(s) finished under {run.experiments}")
    return 0


def _run_arm(params_file: Path, name: str, seed: int, threads: int | None) -> int:
    from cxrlib.core.delegation import enter_piece
    from cxrlib.experiments.grid import plan_grid
    from cxrlib.experiments.runner import GRID_STAGE, arm_key, train_arm

    params = load_params(params_file)
    arms = {(e.name, e.seed): e for e in plan_grid(params)}
    if (name, seed) not in arms:
        names = sorted({n for n, _ in arms})
        raise KeyError(f"{params_file} has no arm {name!r} at seed {seed}; its arms: "
                       f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}; seeds "
                       f"{sorted(params.experiments.seeds)}")
    exp = arms[name, seed]
    run = RunLayout.open(params)
    with enter_piece(run, GRID_STAGE, arm_key(exp)):
        train_arm(params, exp, threads, progress=True)
    print(f"{arm_key(exp)}: predictions in {run.experiment(exp.name, exp.seed).predictions}")
    return 0


def _cancel(params_file: Path) -> int:
    from cxrlib.core.delegation import cancel_jobs

    run = RunLayout.open(load_params(params_file), create=False)
    ids = cancel_jobs(run)
    print(f"cancelled {len(ids)} SLURM job(s) of run {run.root}: {', '.join(ids)}" if ids
          else f"run {run.root} has no delegated SLURM jobs")
    return 0


def _plan(params_file: Path, cluster_file: Path | None, gpu: str | None) -> int:
    from cxrlib.cost import study_plan

    cluster = load_cluster(cluster_file) if cluster_file else None
    print(study_plan(load_params(params_file, check_paths=False), cluster, gpu))
    return 0


def _verify(params_file: Path, full: bool) -> int:
    """Every stage's record against the disk: one line per stage, each problem named."""
    from cxrlib.core.records import check_stage, describe

    run = RunLayout.open(load_params(params_file), create=False)
    if not run.root.is_dir():
        raise FileNotFoundError(f"no run folder {run.root}; nothing to verify")
    failed = False
    for stage in STAGES:
        problems = check_stage(run, stage, full=full)
        if problems is None:
            print(f"{stage}: no record (not finished yet, or finished before records "
                  "existed): not checked")
        elif problems:
            failed = True
            print(f"{stage}: {len(problems)} problem(s)\n{describe(problems, params_file)}")
        else:
            files = run.stage_files(stage)
            mb = sum(p.stat().st_size for p in files) / 1e6
            print(f"{stage}: ok ({len(files)} files, {mb:,.1f} MB"
                  f"{'' if full else ', quick check'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
