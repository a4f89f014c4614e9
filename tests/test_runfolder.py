"""Runs that survive their users: one writer per run folder, records checked by ``cxrlib
verify`` and by each stage, and faults injected into the writes of every stage.

One smoke run is built for the module through the stage entry points (notebook 01's
preparation under :func:`cxrlib.core.records.writing`, then ``train-diffusion``,
``generate-synthetic`` and one experiment of the grid); each test damages its own copy.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from filelock import FileLock, Timeout

from cxrlib.__main__ import main
from cxrlib.core.config import load_params
from cxrlib.core.files import DiskFullError
from cxrlib.core.layout import RUNS_DIR_ENV, RunLayout
from cxrlib.core.lock import RunBusyError, hold, read_holder
from cxrlib.core.outputs import Outputs
from cxrlib.core.records import VerificationError, check_stage, file_sha256, read_record, writing
from cxrlib.data.imagecache import ImageCache, write_image_cache
from cxrlib.data.readers import prepare_cohort
from cxrlib.diffusion import training as diffusion_training
from cxrlib.diffusion.checkpoints import latest_checkpoint, load_weights
from cxrlib.diffusion.pipeline import CXRPipeline
from cxrlib.diffusion.training import train_diffusion
from cxrlib.experiments.grid import plan_grid
from cxrlib.experiments.runner import grid_data, run_experiment, training_set
from cxrlib.synthetic.cohorts import diffusion_source, generate_cohort, replica_plan

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> RunLayout:
    """The smoke run through stages 01-03 and one experiment of 04, each recorded."""
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RUNS_DIR_ENV, str(runs))
        params = load_params(SMOKE)
        run = RunLayout.open(params)
        with writing(run, "01_data_prep"):
            prepare_cohort(params, run, progress=False)
        assert main(["train-diffusion", "--params", str(SMOKE)]) == 0
        assert main(["generate-synthetic", "--params", str(SMOKE)]) == 0
        with writing(run, "04_classifier_experiments"):
            data = grid_data(params, run)
            exp = plan_grid(params)[0]
            run_experiment(exp, params, data, training_set(exp, params, data), run)
    return run


def _copy(run: RunLayout, tmp_path: Path, monkeypatch) -> RunLayout:
    """A copy of the run (times kept, as ``cp -a`` or rsync would) that the commands open."""
    runs = tmp_path / "runs"
    shutil.copytree(run.root, runs / run.root.name)
    monkeypatch.setenv(RUNS_DIR_ENV, str(runs))
    return replace(run, root=runs / run.root.name)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip(path: Path, offset: int, n: int = 64) -> None:
    """Invert ``n`` bytes of a file in place (bit rot, a bad copy)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _scratch(folder: Path) -> list[str]:
    """Temporary names of writes in progress (or killed) under a folder."""
    return sorted(p.name for p in folder.rglob(".*"))


# ---------------------------------------------------------------------------------------------
# One writer per run folder

_HOLD = """
import sys, time
from cxrlib.core.config import load_params
from cxrlib.core.layout import RunLayout
from cxrlib.core.lock import hold
with hold(RunLayout.open(load_params(sys.argv[1])), sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(stage: str) -> subprocess.Popen:
    """Another process holding the run (the environment's run folder) for ``stage``."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(SMOKE), stage], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holder_named(built, tmp_path, monkeypatch,
                                                          capsys):
    run = _copy(built, tmp_path, monkeypatch)
    proc = _holder("02_diffusion_training")
    try:
        assert main(["train-diffusion", "--params", str(SMOKE)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: run folder {run.root} is being written by process "
                              f"{proc.pid} on host {socket.gethostname()}, stage "
                              "02_diffusion_training, since ")
        assert err.count("\n") == 1 and "wait until it has finished" in err
        with pytest.raises(RunBusyError, match=f"process {proc.pid} .* stage 02_diffusion"):
            Outputs(run, "03_sampling_explorer")  # a notebook opened beside it
        assert main(["verify", "--params", str(SMOKE)]) == 0  # readers need no lock
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_taken_over(built, tmp_path, monkeypatch, capsys):
    run = _copy(built, tmp_path, monkeypatch)
    proc = _holder("03_sampling_explorer")
    proc.kill()
    proc.wait()
    assert read_holder(run).pid == proc.pid  # its record stays behind
    with hold(run, "04_classifier_experiments") as taken:
        assert taken and read_holder(run).pid == os.getpid()
        assert read_holder(run).stage == "04_classifier_experiments"
    err = capsys.readouterr().err
    assert (f"took over the lock of run folder {run.root} from process {proc.pid} on host "
            f"{socket.gethostname()}, stage 03_sampling_explorer") in err
    assert "it is no longer running" in err
    assert read_holder(run) is None


def test_a_notebook_holds_the_run_from_its_first_cell_to_its_last(built, tmp_path,
                                                                  monkeypatch):
    """Opened in JupyterLab: ``Outputs`` (first cell) takes the lock, ``finish`` (last cell)
    records the stage and lets go."""
    run = _copy(built, tmp_path, monkeypatch)
    out = Outputs(run, "05_statistics")
    assert (read_holder(run).stage, read_holder(run).pid) == ("05_statistics", os.getpid())
    with pytest.raises(Timeout):  # any other process is refused
        FileLock(str(run.lock), timeout=0).acquire()
    out.table(pd.DataFrame({"a": [1]}), "table")
    out.finish()
    assert read_holder(run) is None
    assert "05_statistics/table.csv" in read_record(run, "05_statistics")


# ---------------------------------------------------------------------------------------------
# Records and verify


def test_verify_passes_an_intact_copy_and_names_each_damage(built, tmp_path, monkeypatch,
                                                            capsys):
    run = _copy(built, tmp_path, monkeypatch)
    assert main(["verify", "--params", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    for stage in ("01_data_prep", "02_diffusion_training", "03_sampling_explorer",
                  "04_classifier_experiments"):
        assert f"{stage}: ok (" in out
    assert "05_statistics: no record" in out

    images = run.image_cache / "images.npy"
    with open(images, "r+b") as f:  # a partial copy
        f.truncate(images.stat().st_size // 2)
    shard = run.synthetic_shard("replicas", 1)
    shard.unlink()
    weights = latest_checkpoint(run.checkpoints) / "model.safetensors"
    st = weights.stat()
    _flip(weights, st.st_size - 100)  # same size, same time: only the checksum can tell
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))

    assert main(["verify", "--params", str(SMOKE), "--quick"]) == 1
    quick = capsys.readouterr().out
    assert "model.safetensors" not in quick  # the quick check trusts size and time
    assert main(["verify", "--params", str(SMOKE)]) == 1
    out = capsys.readouterr().out
    rel = lambda p: p.relative_to(run.root).as_posix()  # noqa: E731
    assert f"{rel(images)}: truncated (" in out
    assert f"{rel(shard)}: missing" in out
    assert f"{rel(weights)}: changed (its SHA-256 differs from the record)" in out
    for stage in ("01_data_prep", "02_diffusion_training", "03_sampling_explorer"):
        assert f"-> run {stage} again: python -m cxrlib run --params {SMOKE} --stage {stage} " \
               "--force" in out
    assert "04_classifier_experiments: ok" in out


def test_stages_refuse_inputs_that_fail_their_records(built, tmp_path, monkeypatch, capsys):
    """A truncated image cache stops training and a corrupted checkpoint stops sampling,
    before any work, with the file and the stage to run again named."""
    run = _copy(built, tmp_path, monkeypatch)
    images = run.image_cache / "images.npy"
    with open(images, "r+b") as f:
        f.truncate(images.stat().st_size - 1000)
    assert main(["train-diffusion", "--params", str(SMOKE)]) == 2
    err = capsys.readouterr().err
    assert "02_diffusion_training cannot start" in err
    assert "01_data_prep/cohort/cache_32/images.npy: truncated" in err
    assert "-> run 01_data_prep again" in err
    with pytest.raises(ValueError, match=r"images\.npy is truncated or damaged"):
        ImageCache(run.image_cache)  # a reader on its own says so too
    _flip(latest_checkpoint(run.checkpoints) / "ema.safetensors", 200)
    with pytest.raises(VerificationError, match=r"ema\.safetensors: changed .*\n.*"
                       r"-> run 02_diffusion_training again"):
        Outputs(run, "03_sampling_explorer")  # notebook 03 opened in JupyterLab
    assert read_holder(run) is None  # the refused notebook let go of the lock


# ---------------------------------------------------------------------------------------------
# A full disk during a checkpoint, a shard and a predictions file


def _fill_disk_at(monkeypatch, owner, name: str, marker: str) -> None:
    """``owner.name`` writes half its file, then fails as on a full disk, when its target path
    contains ``marker``."""
    real = getattr(owner, name)

    def writer(*args, **kwargs):
        target = next(str(a) for a in args if isinstance(a, str | os.PathLike))
        if marker not in target:
            return real(*args, **kwargs)
        real(*args, **kwargs)
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owner, name, writer)


def test_a_full_disk_during_a_checkpoint(built, tmp_path, monkeypatch):
    run = _copy(built, tmp_path, monkeypatch)
    params = load_params(SMOKE, {"diffusion.max_steps": 6})
    cohort = pd.read_parquet(run.manifest)
    before = _digests(run.checkpoints)
    _fill_disk_at(monkeypatch, diffusion_training, "save_file", "step-0000006")
    with pytest.raises(DiskFullError) as err:
        train_diffusion(params, cohort, ImageCache(run.image_cache), run, progress=False)
    message = str(err.value)
    previous = sum(f.stat().st_size for f in (run.checkpoints / "step-0000004").iterdir())
    assert f"disk full while writing {run.checkpoints / 'step-0000006'}" in message
    assert f"needs at least {previous / 1e6:,.1f} MB free" in message  # a checkpoint's size
    assert "MB are free on that disk" in message and "was not written" in message
    assert _digests(run.checkpoints) == before  # nothing lost, nothing half-replaced
    assert _scratch(run.checkpoints) == []
    load_weights(run.checkpoints / "step-0000004")


def test_a_full_disk_during_a_shard(built, tmp_path, monkeypatch):
    run = _copy(built, tmp_path, monkeypatch)
    params = load_params(SMOKE)
    ckpt = latest_checkpoint(run.checkpoints)
    plan = replica_plan(params, pd.read_parquet(run.manifest), ckpt.name)
    for s in (1, 2):
        run.synthetic_shard("replicas", s).unlink()
    first = file_sha256(run.synthetic_shard("replicas", 0))
    _fill_disk_at(monkeypatch, np, "savez", "shard-00001")
    generator = CXRPipeline.from_checkpoint(ckpt, params.diffusion)
    with pytest.raises(DiskFullError) as err:
        generate_cohort(params, plan, diffusion_source(params, generator), run, "replicas",
                        progress=False)
    images = params.sampling.shard_size * params.data.resolution ** 2  # uint8
    assert f"disk full while writing {run.synthetic_shard('replicas', 1)}: it needs at least " \
           f"{images / 1e6:,.1f} MB free" in str(err.value)
    assert file_sha256(run.synthetic_shard("replicas", 0)) == first
    assert not run.synthetic_shard("replicas", 1).exists()
    assert _scratch(run.synthetic("replicas")) == []


def test_a_full_disk_during_a_predictions_file(built, tmp_path, monkeypatch):
    run = _copy(built, tmp_path, monkeypatch)
    params = load_params(SMOKE)
    data = grid_data(params, run)
    exp = plan_grid(params)[0]
    done = run.experiment(exp.name, exp.seed)
    before = file_sha256(done.predictions)
    _fill_disk_at(monkeypatch, pd.DataFrame, "to_parquet", "predictions")
    with pytest.raises(DiskFullError, match=re.escape(f"disk full while writing "
                                                      f"{done.predictions}: it needs at least ")
                       + r".* MB free .* predictions\.parquet keeps its previous version"):
        run_experiment(exp, params, data, training_set(exp, params, data), run)
    assert file_sha256(done.predictions) == before  # the old predictions, whole
    assert _scratch(done.root) == []


def test_a_disk_too_small_for_an_image_cache_fails_before_writing_it(tmp_path, monkeypatch):
    """The cache's memory map is allocated first: a full disk is an error naming the file and
    its size, not a SIGBUS half way through, and the cache there before is kept."""
    folder = tmp_path / "cache_32"
    with write_image_cache(folder, 2, 32) as cache:
        cache.add(["a", "b"], np.ones((2, 32, 32), np.uint8))
    before = _digests(folder)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    full = re.escape(f"disk full while writing {folder / 'images.npy'}: it needs at least "
                     "1.0 MB free")
    with pytest.raises(DiskFullError, match=full), write_image_cache(folder, 1000, 32) as cache:
        cache.add(["c"], np.zeros((1, 32, 32), np.uint8))
    assert _digests(folder) == before and _scratch(folder) == []
    assert ImageCache(folder).image_ids == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# A kill in the middle of each stage's writes

def _killed_mid_write(owner, name: str, marker: str, argv: list[str]) -> int:
    """Run the command ``argv`` in a forked child (everything is imported already) whose
    ``owner.name`` writes half of the file whose path contains ``marker`` and is then killed
    as by ``kill -9``; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real = getattr(owner, name)

            def writer(*args, **kwargs):
                path = next(str(a) for a in args if isinstance(a, str | os.PathLike))
                real(*args, **kwargs)
                if marker in path:
                    with open(path, "r+b") as f:
                        f.truncate(os.path.getsize(path) // 2)
                    os.kill(os.getpid(), signal.SIGKILL)

            setattr(owner, name, writer)
            main(argv)
        finally:
            os._exit(1)
    return os.waitpid(pid, 0)[1]


#: stage command; the writer killed half way (its module or class, its name, a part of the
#: path it writes); the folder compared before and after; the file that must not exist after
_KILLS = {
    "checkpoint": (["train-diffusion"], (diffusion_training, "save_file", "step-0000006"),
                   lambda run: run.checkpoints,
                   lambda run: run.checkpoints / "step-0000006"),
    "shard": (["generate-synthetic"], (np, "savez", "shard-00001"),
              lambda run: run.synthetic("replicas") / "shards",
              lambda run: run.synthetic_shard("replicas", 1)),
    "predictions": (["run-experiments"], (pd.DataFrame, "to_parquet", "predictions"),
                    lambda run: run.experiments,
                    lambda run: run.experiment(plan_grid(load_params(SMOKE))[1].name, 0)
                    .predictions),
}


@pytest.mark.parametrize("write", list(_KILLS))
def test_a_kill_in_the_middle_of_a_write(built, tmp_path, monkeypatch, write):
    """kill -9 while a checkpoint, a shard or a predictions file is half on disk: what was
    finished before is unchanged and verified, the half-written file is only a temporary, and
    the killed writer's lock is taken over by the next one."""
    run = _copy(built, tmp_path, monkeypatch)
    command, patch, folder, interrupted = _KILLS[write]
    params_file = SMOKE
    if write == "checkpoint":  # train on from the finished step 4
        params_file = tmp_path / "smoke.yaml"
        params_file.write_text(SMOKE.read_text().replace("max_steps: 4\n  warmup",
                                                         "max_steps: 6\n  warmup"))
    if write == "shard":  # generation stopped after its first shard
        for s in (1, 2):
            run.synthetic_shard("replicas", s).unlink()
        run.synthetic_manifest("replicas").unlink()
    before = _digests(folder(run))
    status = _killed_mid_write(*patch, [*command, "--params", str(params_file)])
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    after = _digests(folder(run))
    assert {k: after.get(k) for k in before} == before  # nothing finished was touched
    assert not interrupted(run).exists()
    assert any(".tmp" in name for name in _scratch(folder(run)))  # the half file, aside
    assert read_holder(run).pid != os.getpid()  # the killed writer's record
    earlier = {"checkpoint": "01_data_prep", "shard": "02_diffusion_training",
               "predictions": "03_sampling_explorer"}[write]
    assert check_stage(run, earlier) == []
    with hold(run, "next writer") as taken:  # the stale lock is taken over
        assert taken
