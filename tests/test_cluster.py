"""Stages on a cluster: the cluster file, the delegation record, resumable classifier training,
``cxrlib plan``, and (marked ``slurm``) the grid, cohort generation and diffusion training as
real SLURM jobs through submitit, against the one-node cluster of ``.ci/slurm-up``.

The SLURM tests skip where no cluster answers ``scontrol ping``; in CI (``CI=true``) the
session fails if they were skipped (conftest). Each compares a cluster run with a local run of
the same pieces at the same thread count (one), and interrupts jobs the way a scheduler does:
``scancel --signal USR2`` (preemption or the time limit: submitit requeues the job) and plain
``scancel`` (the job is gone: the submitter submits the piece again).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_experiments import _write_cohort

from cxrlib.classifier.training import RoundState, train_classifier
from cxrlib.cluster.spec import ClusterSpec, load_cluster
from cxrlib.core import delegation
from cxrlib.core.config import load_params
from cxrlib.core.delegation import Delegated, Delegation, cancel_jobs, write_delegation
from cxrlib.core.errors import ParamsError
from cxrlib.core.layout import RunLayout
from cxrlib.core.lock import RunBusyError
from cxrlib.core.records import writing
from cxrlib.core.schema import ClassifierSpec
from cxrlib.data.imagecache import ImageCache
from cxrlib.data.readers import prepare_cohort
from cxrlib.synthetic.cohorts import plan_for, rebalance_plan, replica_plan

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "cluster"
ONE_NODE = FIXTURES / "one-node.yaml"
GRID = FIXTURES / "grid.yaml"
SMOKE = ROOT / "params" / "smoke.yaml"


def _slurm_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "UP" in out.stdout


slurm = pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster answers `scontrol ping` "
                           "(CI starts one with .ci/slurm-up)")


def _cli(*args: str, runs: Path, threads: int | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "CXRLIB_RUNS_DIR": str(runs)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-m", "cxrlib", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for(check, what: str, timeout: float = 120.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# -- without a cluster -----------------------------------------------------------------------
def test_cluster_file_is_validated(tmp_path):
    spec = load_cluster(ROOT / "params" / "cluster" / "slurm.yaml")
    assert spec.executor == "slurm" and spec.diffusion.tasks_per_node == 4
    bad = tmp_path / "c.yaml"
    bad.write_text("grid: {cpus_per_tsk: 4}\n")
    with pytest.raises(ParamsError, match=r"c.yaml: invalid cluster file: key 'grid.cpus_per_tsk'"):
        load_cluster(bad)


@pytest.fixture(scope="module")
def smoke_cohort(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRLIB_RUNS_DIR", str(runs))
        params = load_params(SMOKE)
        cohort = prepare_cohort(params, RunLayout.open(params), progress=False)
    return cohort.manifest, ImageCache(cohort.cache_dir)


def test_classifier_training_resumes_to_the_same_weights(smoke_cohort, tmp_path):
    """Stopped after round 3 of 6 and resumed from its saved state, a training ends with the
    weights, history and kept round of an uninterrupted one (bit for bit, one thread)."""
    manifest, cache = smoke_cohort
    train, val = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    spec = ClassifierSpec(backbone="resnet10t", protocol="converged", max_steps=12,
                          eval_every=2, patience=20, batch_size=16, ema_decay=0.9,
                          augment={"hflip": 0.5, "noise_p": 0.5, "mix_p": 0.5})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = train_classifier(spec, train, val, cache, seed=3, progress=False)
        state = RoundState(tmp_path / "resume", {"seed": 3})

        def stop_at_round_4(model, row):
            if row["epoch"] == 4:
                raise KeyboardInterrupt  # what a preemption does to the process

        with pytest.raises(KeyboardInterrupt):
            train_classifier(spec, train, val, cache, seed=3, progress=False,
                             on_round=stop_at_round_4, resume=state)
        assert json.loads((state.folder / "state.json").read_text())["rounds"] == 3
        resumed = train_classifier(spec, train, val, cache, seed=3, progress=False,
                                   resume=state)
        other = RoundState(tmp_path / "resume", {"seed": 4})  # another training's state
        assert state.saved() and not other.saved()
    finally:
        torch.set_num_threads(before)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    cols = ["epoch", "step", "images_seen", "train_loss", "val_loss", "lr"]
    pd.testing.assert_frame_equal(whole.history[cols], resumed.history[cols])
    assert (whole.best_epoch, whole.steps) == (resumed.best_epoch, resumed.steps)


def test_delegated_jobs_hold_off_other_writers(smoke_cohort, tmp_path, monkeypatch):
    """Jobs a dead submitter left running: the same stage may re-attach; another stage and a
    process that is not the named job are refused, naming the jobs."""
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path))
    run = RunLayout.open(load_params(SMOKE))
    record = Delegation("04_classifier_experiments", "process 1 on host h",
                        {"arm a seed 0": Delegated("04_classifier_experiments/a/seed-0", "71_0"),
                         "arm b seed 0": Delegated("04_classifier_experiments/b/seed-0", "71_1")})
    write_delegation(run, record)
    monkeypatch.setattr(delegation, "job_states", lambda: {"71_0": "RUNNING"})
    live = r"1 SLURM job\(s\) of stage 04_classifier_experiments \(71_0\) still queued"
    with pytest.raises(RunBusyError, match=live), writing(run, "02_diffusion_training"):
        pass
    with delegation.enter_piece(run, "04_classifier_experiments", "arm b seed 0"):
        pass  # its job is gone: a hand-started writer may redo that arm
    piece = partial(delegation.enter_piece, run, "04_classifier_experiments", "arm a seed 0")
    with pytest.raises(RunBusyError, match="delegated to SLURM job 71_0"), piece():
        pass
    monkeypatch.setenv(delegation.PIECE_ENV, "arm a seed 0")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setattr(delegation, "RECORD_WAIT_SECONDS", 0.5)
    with pytest.raises(RunBusyError, match="job 99 was not delegated piece arm a seed 0"), piece():
        pass
    monkeypatch.setattr(delegation.shutil, "which", lambda _: None)  # no scancel here
    assert cancel_jobs(run) == ["71_0", "71_1"]
    assert {d.status for d in delegation.read_delegation(run).pieces.values()} == {"cancelled"}


def test_plan_prices_stages_from_the_gpu_benchmark(tmp_path, monkeypatch):
    from cxrlib.cost import study_plan

    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path / "runs"))
    params = load_params(ROOT / "params" / "chexpert.yaml", check_paths=False)
    bench = tmp_path / "bench" / "gpu"
    bench.mkdir(parents=True)
    (bench / "gpu_unet.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3 (torch 2)", "parameters": 1, "resolution": 256,
        "batch": 36, "train": {"fp16": {"img_per_s": 100.0}, "fp32": {"img_per_s": 40.0}},
        "sample": [{"sampler": "ddim", "steps": 200, "precision": "fp32", "img_per_s": 5.0}]}))
    text = study_plan(params, load_cluster(ROOT / "params" / "cluster" / "slurm.yaml"),
                      bench_root=tmp_path / "bench")
    # 278,000 steps x 36 x 4 GPUs at 100 img/s per GPU (fp16, the preset's precision)
    assert f"{278_000 * 144 / 100 / 3600:,.1f} GPU-h" in text
    assert "an array of 204 task(s), one arm each, 16 at a time" in text
    assert "unknown until notebook 01 has run" in text  # no manifest yet: no cohort sizes
    assert "no figure: no classifier benchmark ran on H100" in text
    none = study_plan(params, gpu="A100", bench_root=tmp_path / "bench")
    assert "no figure: no training benchmark ran on A100" in none


# -- on the one-node cluster -----------------------------------------------------------------
def _preempt(job: str, log: Path) -> None:
    """What SLURM does to a preempted job (or one at its time limit): USR2 to its processes,
    on which submitit checkpoints and requeues it. SLURM holds a requeued job back for two
    minutes; the test lets it start at once, as an administrator can."""
    # scancel can report "Job can not be altered now" for the batch step while the signal
    # reaches the job's processes: the requeue is read from the job's log instead
    subprocess.run(["scancel", "--signal", "USR2", job], check=False, capture_output=True)
    _wait_for(lambda: "Requeued job" in log.read_text(), f"job {job}'s requeue", timeout=60)

    def state() -> str:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                              text=True).stdout.strip()

    _wait_for(lambda: state() == "PENDING", f"job {job} back in the queue", timeout=60)

    def released() -> bool:
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                       capture_output=True)
        return state() != "PENDING"

    _wait_for(released, f"job {job} to start again", timeout=60, every=1.0)
@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    """The four-arm grid study (stand-in synthetic cohorts) prepared twice: one run folder for
    the local reference, one for SLURM."""
    folders = []
    for name in ("local", "slurm"):
        runs = tmp_path_factory.mktemp(f"grid-{name}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CXRLIB_RUNS_DIR", str(runs))
            params = load_params(GRID)
            run = RunLayout.open(params)
            cohort = prepare_cohort(params, run, progress=False)
        cache = ImageCache(cohort.cache_dir)
        _write_cohort(replica_plan(params, cohort.manifest, "step-0000004"), cache, run,
                      "replicas")
        _write_cohort(rebalance_plan(params, cohort.manifest, "step-0000004"), cache, run,
                      "rebalance")
        _write_cohort(plan_for(params, cohort.manifest, "oracle", ""), cache, run, "oracle")
        folders.append((runs, run))
    return params, folders


@slurm
def test_grid_on_slurm_equals_local_through_preemption(grid_runs, monkeypatch):
    """The grid as a SLURM array (one thread per task) gives the local predictions exactly,
    with one arm preempted mid-training (requeued, resumed from its last round); while it runs
    a second submitter and a hand-started arm are refused, naming the holder and the jobs."""
    from cxrlib.experiments.grid import plan_grid
    from cxrlib.experiments.runner import train_arm

    params, [(local_runs, local), (slurm_runs, remote)] = grid_runs
    submitter = _cli("run-experiments", "--params", str(GRID), "--cluster", str(ONE_NODE),
                     runs=slurm_runs)
    _wait_for(remote.delegated.exists, "the submission", timeout=180)
    second = _cli("run-experiments", "--params", str(GRID), "--cluster", str(ONE_NODE),
                  runs=slurm_runs)
    by_hand = _cli("run-arm", "--params", str(GRID), "--arm", "real_only.f50", "--seed", "0",
                   runs=slurm_runs)
    target = "real_plus_synthetic_x1.f50"  # the last task: it starts after the first ones
    resume = remote.experiment(target, 0).root / ".model.resume" / "state.json"
    _wait_for(resume.exists, f"{target}'s first saved round", timeout=300, every=0.05)
    job = delegation.read_delegation(remote).pieces[f"arm {target} seed 0"].job_id
    _preempt(job, remote.jobs / "04_classifier_experiments" / f"{job}_0_log.out")
    for refused in (second, by_hand):
        out, _ = refused.communicate(timeout=120)
        assert refused.returncode == 2 and "is being written by process" in out, out[-2000:]
        assert "SLURM job(s) of stage 04_classifier_experiments" in out, out[-2000:]

    # the local reference while the cluster works (its tasks and this use one thread each)
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(local_runs))
    before = torch.get_num_threads()
    try:
        for exp in plan_grid(params):
            train_arm(params, exp, threads=1)
    finally:
        torch.set_num_threads(before)
    said = _finish(submitter, timeout=600)
    # the requeued job (or, had the submitter seen it gone, the job submitted again) resumed
    folder = remote.jobs / "04_classifier_experiments"
    logs = {f.name: f.read_text() for f in folder.glob("*_log.out")}
    resumed = [name for name, text in logs.items()
               if "classifier training resumed after round" in text and target in text]
    log = logs[f"{job}_0_log.out"]
    assert resumed, f"no job of {target} resumed; submitter: {said[-1500:]}; job: {log[-1500:]}"
    assert not remote.delegated.exists()  # every piece done: the record is gone
    for exp in plan_grid(params):
        a = pd.read_parquet(local.experiment(exp.name, 0).predictions)
        b = pd.read_parquet(remote.experiment(exp.name, 0).predictions)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        assert not (remote.experiment(exp.name, 0).root / ".model.resume").exists()


def _copy_smoke_run(smoke_pipeline, dest: Path) -> Path:
    """The session's smoke run folder (notebooks 01-05 done) copied under ``dest``."""
    source = Path(os.environ["CXRLIB_RUNS_DIR"]) / "smoke"
    shutil.copytree(source, dest / "smoke", ignore=shutil.ignore_patterns(".writer.*"))
    return dest / "smoke"


@slurm
def test_generation_on_slurm_equals_local(smoke_pipeline, tmp_path):
    """The replica cohort generated again by shard-group array tasks equals the one generated
    locally with the same thread count, shard for shard."""
    copies = {}
    for where in ("local", "slurm"):
        run = _copy_smoke_run(smoke_pipeline, tmp_path / where)
        shutil.rmtree(run / "03_sampling_explorer" / "synthetic" / "replicas")
        copies[where] = run
    local = _cli("generate-synthetic", "--params", str(SMOKE), runs=tmp_path / "local",
                 threads=1)
    _finish(local)
    out = _finish(_cli("generate-synthetic", "--params", str(SMOKE), "--cluster", str(ONE_NODE),
                       runs=tmp_path / "slurm"))
    assert "submitted 2 SLURM job(s) for stage 03_sampling_explorer" in out, out[-2000:]
    shards = sorted((copies["local"] / "03_sampling_explorer" / "synthetic" / "replicas" /
                     "shards").glob("*.npz"))
    assert len(shards) == 3
    import numpy as np

    for path in shards:
        other = copies["slurm"] / path.relative_to(copies["local"])
        a, b = np.load(path), np.load(other)
        assert np.array_equal(a["images"], b["images"]) and \
            np.array_equal(a["image_ids"], b["image_ids"]), path.name
    manifest = Path("03_sampling_explorer/synthetic/replicas/manifest.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(copies["local"] / manifest),
                                  pd.read_parquet(copies["slurm"] / manifest))


@slurm
def test_two_task_diffusion_training_resumes_after_scancel(smoke_pipeline, tmp_path):
    """Diffusion training as one job of two tasks (gloo, one node): killed with scancel after
    its first checkpoint, submitted again, resumed, it ends on the checkpoint of an
    uninterrupted two-task job."""
    longer = tmp_path / "longer.yaml"
    longer.write_text(f"extends: {SMOKE}\ndiffusion: {{max_steps: 200, checkpoint_every: 2, "
                      "sample_every: 200}\n")
    runs = {}
    for where in ("whole", "killed"):
        run = _copy_smoke_run(smoke_pipeline, tmp_path / where)
        shutil.rmtree(run / "02_diffusion_training" / "checkpoints")
        runs[where] = run
    whole = _cli("train-diffusion", "--params", str(longer), "--cluster", str(ONE_NODE),
                 runs=tmp_path / "whole")
    assert "processes: 2; steps 0 -> 200" in _finish(whole)
    killed = _cli("train-diffusion", "--params", str(longer), "--cluster", str(ONE_NODE),
                  runs=tmp_path / "killed")
    first = runs["killed"] / "02_diffusion_training" / "checkpoints" / "step-0000002"
    _wait_for(first.exists, "the first checkpoint", timeout=180, every=0.05)
    record = delegation.read_delegation(RunLayout(runs["killed"], 32, "smoke", ROOT))
    job = record.pieces["diffusion training"].job_id
    subprocess.run(["scancel", job], check=True)
    out = _finish(killed)
    assert f"job {job} ended without a result" in out and "(attempt 2)" in out, out[-3000:]
    final = Path("02_diffusion_training/checkpoints/step-0000200")
    for part in ("model.safetensors", "ema.safetensors"):
        a = load_file(runs["whole"] / final / part)
        b = load_file(runs["killed"] / final / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@slurm
def test_a_failing_piece_names_itself_and_cancel_stops_a_stage(tmp_path):
    """A piece that raises is not retried: the error names the piece, its job and its log's
    last lines. A submitter that died is replaced by one that waits for its job; ``cxrlib
    cancel`` stops a waiting submitter."""
    from cxrlib.cluster.slurm import Piece, PieceFailedError, StageCancelledError, run_pieces

    run = RunLayout(tmp_path / "toy", 32, "toy", tmp_path)
    run.root.mkdir()
    spec = ClusterSpec.model_validate(
        {**load_cluster(ONE_NODE).model_dump(), "max_retries": 3})
    broken = Piece("shard group 1 of 1", "x", partial(load_cluster, tmp_path / "absent.yaml"))
    with pytest.raises(PieceFailedError) as err:
        run_pieces([broken], spec, spec.grid, run, "03_sampling_explorer", desc="toy")
    text = str(err.value)
    assert "shard group 1 of 1 failed in SLURM job" in text and "cluster file not found" in text
    assert "last lines of its log" in text and "Traceback" in text
    assert delegation.read_delegation(run).pieces["shard group 1 of 1"].attempts == 1

    # a submitter that dies leaves its job: the same stage re-attaches instead of resubmitting
    script = (f"import time; from functools import partial; from pathlib import Path\n"
              f"from cxrlib.cluster.slurm import Piece, run_pieces\n"
              f"from cxrlib.cluster.spec import load_cluster\n"
              f"from cxrlib.core.layout import RunLayout\n"
              f"spec = load_cluster({str(ONE_NODE)!r})\n"
              f"run = RunLayout(Path({str(run.root)!r}), 32, 'toy', Path({str(tmp_path)!r}))\n"
              "run_pieces([Piece('arm nap seed 0', 'z', partial(time.sleep, 8))], spec, "
              "spec.grid, run, '02_diffusion_training', desc='toy')\n")
    dying = subprocess.Popen([sys.executable, "-c", script])
    _wait_for(lambda: (r := delegation.read_delegation(run)) and r.stage.startswith("02"),
              "the first submitter's record")
    dying.kill()
    dying.wait()
    job = delegation.read_delegation(run).pieces["arm nap seed 0"].job_id
    nap = Piece("arm nap seed 0", "z", partial(time.sleep, 8))
    run_pieces([nap], spec, spec.grid, run, "02_diffusion_training", desc="toy")
    assert sorted(p.name for p in (run.jobs / "02_diffusion_training").glob("*_submitted.pkl")) \
        == [f"{job}_submitted.pkl"]  # waited for the running job, submitted nothing new

    slow = Piece("arm slow seed 0", "y", partial(time.sleep, 120))
    failure: list[BaseException] = []

    def wait() -> None:
        try:
            run_pieces([slow], spec, spec.grid, run, "04_classifier_experiments", desc="toy")
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            failure.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    _wait_for(lambda: (r := delegation.read_delegation(run)) and r.stage.startswith("04"),
              "the submission")
    assert len(cancel_jobs(run)) == 1
    waiter.join(timeout=60)
    assert failure and isinstance(failure[0], StageCancelledError), failure
