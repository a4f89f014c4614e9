"""Project-level checks: parameter files, notebooks kept clean, run folders, the runner."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from cxrlib import notebook_runner
from cxrlib.__main__ import main
from cxrlib.core.config import load_params, parse_overrides, read_tree
from cxrlib.core.errors import ParamsError
from cxrlib.core.layout import STAGES, RunLayout
from cxrlib.core.progress import PROGRESS_ENV
from cxrlib.core.schema import Params
from cxrlib.core.summary import read_summary, schema_problems, stage_precisions
from cxrlib.hardware import precision_label
from cxrlib.notebook_runner import run_pipeline, run_stage

ROOT = Path(__file__).resolve().parent.parent
PARAM_FILES = sorted((ROOT / "params").glob("*.yaml"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_expected_files_exist():
    assert {p.name for p in PARAM_FILES} >= {"smoke.yaml", "demo.yaml", "chexpert.yaml",
                                             "mimic.yaml"}
    # every notebook is a pipeline stage, so the pipeline test executes every one of them
    assert [n.stem for n in NOTEBOOKS] == list(STAGES)


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_matches_the_schema(path):
    params = Params.model_validate(read_tree(path))
    assert Params.from_json(params.to_json()) == params  # round-trips through JSON


def test_a_params_file_extends_another_and_states_only_what_it_changes(tmp_path):
    (tmp_path / "base.yaml").write_text((ROOT / "params" / "smoke.yaml").read_text())
    (tmp_path / "variant.yaml").write_text(
        "extends: base.yaml\nrun: {name: variant}\nsampling: {replicas: 3}\n")
    base, variant = load_params(tmp_path / "base.yaml"), load_params(tmp_path / "variant.yaml")
    assert (variant.run.name, variant.sampling.replicas) == ("variant", 3)
    # Keys the variant does not name are the base's, in the same section and in others.
    assert variant.sampling.steps == base.sampling.steps
    assert variant.diffusion == base.diffusion
    (tmp_path / "base.yaml").write_text("extends: variant.yaml\n")
    with pytest.raises(ParamsError, match="leads back to itself"):
        load_params(tmp_path / "variant.yaml")


@pytest.mark.parametrize("name", ["chexpert.yaml", "mimic.yaml"])
def test_real_data_presets_name_the_placeholder_path(name):
    with pytest.raises(ParamsError, match=r"data\.sites\[0\]\.root.*does not exist") as err:
        load_params(ROOT / "params" / name)
    assert name in str(err.value)


def test_run_folder_refuses_other_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path))
    run = RunLayout.open(load_params(ROOT / "params" / "smoke.yaml"))
    assert run.root == tmp_path / "smoke"
    assert json.loads(run.params.read_text())["run"]["name"] == "smoke"
    other = load_params(ROOT / "params" / "smoke.yaml", {"data.resolution": 48})
    with pytest.raises(ParamsError, match=r"keys differ: data\.resolution"):
        RunLayout.open(other)
    # every stage writes into a folder named after its notebook, inside the run
    assert [run.stage(s).name for s in STAGES] == [n.stem for n in NOTEBOOKS]
    assert run.checkpoints.parent == run.stage("02_diffusion_training")
    assert run.judge.parent == run.synthetic("replicas").parent.parent
    with pytest.raises(KeyError, match="unknown stage '02_diffusion'"):
        run.stage("02_diffusion")


def test_old_guidance_keys_fail_with_the_mapping_to_w(tmp_path):
    """The guidance scale became the continuous weight w; a file with the old keys must not
    load silently with another meaning."""
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["sampling"]["guidance_scale"] = 2.0
    file = tmp_path / "old.yaml"
    file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"sampling\.guidance_scale is now sampling\.guidance"
                                          r".*w = s - 1"):
        load_params(file)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stripped_and_parameterised(path):
    """Outputs stay out of git (except the reference output of NBVAL_CHECK_OUTPUT cells), and
    the cell tagged ``parameters`` holds plain literal assignments only."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        if "NBVAL_CHECK_OUTPUT" in cell.source:
            assert cell.outputs, f"{path.name}: NBVAL_CHECK_OUTPUT cell lacks its reference"
            continue
        assert cell.execution_count is None, f"{path.name}: execution count kept"
        assert not cell.outputs, f"{path.name}: outputs kept in cell {cell.source[:40]!r}"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    defaults = {}
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign), f"{path.name}: parameters cell has {stmt!r}"
        defaults[stmt.targets[0].id] = ast.literal_eval(stmt.value)  # plain literals only
    # the defaults are the smoke run the pipeline test executes: the notebook as opened
    assert (path.parent / defaults["params_file"]).resolve() == ROOT / "params" / "smoke.yaml"
    assert defaults.get("progress", True) is True and not defaults.get("run_name")


def _checked_output(nb: nbformat.NotebookNode) -> list[str]:
    """The text every ``# NBVAL_CHECK_OUTPUT`` cell printed (streams and text/plain)."""
    return ["".join(o.get("text") or o.get("data", {}).get("text/plain", "") for o in c.outputs)
            for c in nb.cells if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source]


def test_pipeline_runs_every_stage_and_renders_the_reports(smoke_pipeline, capsys):
    """``python -m cxrlib run`` end to end on smoke: five executed notebooks, five HTML
    reports with the code hidden, an index page; a second run skips every finished stage.

    This is the one execution of each notebook per test session (the notebooks' default
    parameters are this smoke run, see above): every cell must run without error, and cells
    marked ``# NBVAL_CHECK_OUTPUT`` must print what the committed notebook holds, as under
    ``pytest --nbval-lax notebooks/``, which still works on its own."""
    reports, index = smoke_pipeline.reports, smoke_pipeline.index
    run = RunLayout.open(load_params(ROOT / "params" / "smoke.yaml"))
    for stage in STAGES:
        executed = nbformat.read(run.executed(stage), as_version=4)
        reference = nbformat.read(ROOT / "notebooks" / f"{stage}.ipynb", as_version=4)
        assert _checked_output(executed) == _checked_output(reference), stage
        html = (reports / f"{stage}.html").read_text()
        assert "<img" in html, stage  # every report has figures
        assert "params_file =" not in html, stage  # code hidden
        assert f'href="{stage}.html"' in index.read_text()
        assert "Phantom data, not X-ray images" in html, stage  # the provenance header
        assert str(ROOT) not in html, stage  # no path of the machine that rendered it
    html = {s: (reports / f"{s}.html").read_text() for s in STAGES}
    assert "Figure E1" in html["01_data_prep"]
    assert "leakage check passed" in html["04_classifier_experiments"]
    assert "Holm-adjusted" in html["05_statistics"]  # the generated findings
    assert {"cooccurrence.png", "samples_per_label.png", "check_macro_auroc.csv"} <= {
        p.name for p in run.stage("01_data_prep").iterdir()}
    assert {"supplementation_f100.png", "external_site.png", "primary_comparisons.csv",
            "comparisons_secondary.csv", "subgroups.png", "findings.txt", "forest.png"} <= {
        p.name for p in run.stage("05_statistics").iterdir()}
    # the worth curves: every generator setting audited (FRD included), every axis on the page
    settings = pd.read_csv(run.stage("03_sampling_explorer") / "generator_settings.csv")
    assert sorted(zip(settings["step"], settings["guidance"], strict=True)) == [
        (2, 0.0), (4, 0.0), (4, 1.0)]
    assert settings["frd"].notna().all() and settings["fidelity_ratio"].notna().all()
    page03 = html["03_sampling_explorer"].split("Generator-settings-of-the-worth-curves", 1)[1]
    assert "<th>FRD</th>" in page03 and "<th>fidelity (x real)</th>" in page03  # shown, named
    assert {"worth_curves.png", "measures_vs_worth.png", "worth_differences.csv",
            "guidance.txt"} <= {p.name for p in run.stage("06_worth_curves").iterdir()}
    assert "Generator training steps" in html["06_worth_curves"]
    assert "What an extra image is worth, and what buys it" in index.read_text()
    # the notebooks' own output streamed while they ran, and one line per finished stage
    assert "run 'smoke' -> " in smoke_pipeline.out  # printed by notebook 01
    assert "diffusion steps: 100%" in smoke_pipeline.err  # notebook 02's progress bar
    assert "diffusion steps" not in html["02_diffusion_training"]  # not on the page
    for stage in STAGES:
        assert f"[done] {stage}: " in smoke_pipeline.out and f"{stage}.html" in smoke_pipeline.out
    # stage times and provenance in the run's summary, copied beside the HTML
    summary = read_summary(run)
    assert list(summary["minutes_per_stage"]) == list(STAGES)
    assert summary["minutes_total"] == pytest.approx(sum(summary["minutes_per_stage"].values()),
                                                     abs=0.02)
    assert json.loads((reports / "summary.json").read_text()) == summary
    assert schema_problems(summary) == []  # every key of the headline summary, typed
    assert summary["seeds"] == [0] and summary["internal_test_images"] > 0
    assert set(summary["optimizer_steps"].values()) == {4}  # the smoke step budget, every arm
    assert summary["provenance"]["phantoms"] is True
    assert summary["provenance"]["params_file"] == "params/smoke.yaml"
    assert summary["labels"]["test_sets"]["chexpert (internal)"] == (
        "CheXpert-style phantoms (internal)")
    # the precision every training stage ran in (smoke: fp32 everywhere), also on the index
    fp32 = precision_label("no")
    assert summary["precision"] == {s: fp32 for s in STAGES
                                    if s not in ("05_statistics", "06_worth_curves")}
    assert {row["test_set"] for row in summary["primary"]} >= {"chexpert (internal)"}
    page = index.read_text()
    assert f"min; {fp32})" in page
    assert "claims</h2>" in page and "Manipulation checks" in page
    assert "<img src='forest.png'" in page and (reports / "forest.png").exists()
    # each stage recorded what it wrote, under the runner's lock; the finished run verifies
    assert all(run.record(s).exists() for s in STAGES) and not run.holder.exists()
    assert main(["verify", "--params", str(ROOT / "params" / "smoke.yaml")]) == 0
    run_pipeline(ROOT / "params" / "smoke.yaml", reports_root=smoke_pipeline.reports_root)
    assert capsys.readouterr().out.count("[skip]") == len(STAGES)


def _fake_papermill(calls: list[dict]):
    """Stands in for papermill.execute_notebook: records its arguments and the progress mode
    the kernel would inherit, prints like a kernel, writes an executed notebook."""
    def execute(source, dest, **kwargs):
        calls.append({**kwargs, "env": os.environ.get(PROGRESS_ENV)})
        if "stdout_file" in kwargs:
            kwargs["stdout_file"].write("kernel says hello\n")
        nb = nbformat.v4.new_notebook()
        nb.metadata["papermill"] = {"duration": 90.0}
        nbformat.write(nb, dest)
    return execute


def test_run_streams_the_notebook_output_unless_quiet(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(notebook_runner.papermill, "execute_notebook", _fake_papermill(calls))
    smoke = ROOT / "params" / "smoke.yaml"
    run_pipeline(smoke, ("01_data_prep",), reports_root=tmp_path / "reports")
    out = capsys.readouterr().out
    assert "kernel says hello" in out
    assert f"[done] 01_data_prep: 1.5 min; report {tmp_path / 'reports' / 'smoke'}" in out
    assert calls[0]["env"] == "log"  # pytest's stderr is no terminal: bars sized for a log
    assert calls[0]["progress_bar"] is False and calls[0]["stderr_file"] is sys.stderr
    assert os.environ.get(PROGRESS_ENV) is None  # only the kernel's environment had it
    run_pipeline(smoke, ("02_diffusion_training",), reports_root=tmp_path / "reports",
                 quiet=True)
    assert "kernel says hello" not in capsys.readouterr().out
    assert calls[1]["progress_bar"] is True and "stdout_file" not in calls[1]
    assert calls[1]["env"] is None  # today's behaviour: widget bars in the saved notebook
    summary = json.loads((tmp_path / "reports" / "smoke" / "summary.json").read_text())
    assert summary.pop("provenance")["run"] == "smoke"
    assert summary == {"minutes_total": 3.0, "minutes_per_stage": {"01_data_prep": 1.5,
                                                                   "02_diffusion_training": 1.5},
                       "precision": {}}  # the stand-in kernels trained nothing


def test_summary_says_the_precision_each_stage_trained_in(tmp_path, monkeypatch):
    """From the training histories each stage wrote: distinct values joined (a run resumed
    on another machine), stages without a precision column or history left out."""
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path))
    run = RunLayout.open(load_params(ROOT / "params" / "smoke.yaml"))
    fp32, bf16 = "fp32 (CPU bf16 units: none)", "bf16 autocast (GPU: NVIDIA H200)"
    histories = {"01_data_prep/check_history.csv": [fp32, fp32],
                 "02_diffusion_training/loss_history.csv": [None, fp32, bf16, bf16],
                 "04_classifier_experiments/a/seed-0/history.csv": [bf16],
                 "04_classifier_experiments/b/seed-1/history.csv": [bf16, bf16]}
    for rel, values in histories.items():
        (run.root / rel).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": range(len(values)), "precision": values}).to_csv(
            run.root / rel, index=False)
    run.judge.mkdir(parents=True)  # a judge saved before histories said their precision
    pd.DataFrame({"step": [1]}).to_csv(run.judge / "history.csv", index=False)
    assert stage_precisions(run) == {"01_data_prep": fp32,
                                     "02_diffusion_training": f"{fp32}; {bf16}",
                                     "04_classifier_experiments": bf16}


def test_a_failing_notebook_names_the_stage_and_the_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(SystemExit, match=r"04_classifier_experiments failed in cell \d+: "
                       r"DataError: no manifest") as err:
        run_stage("04_classifier_experiments", ROOT / "params" / "smoke.yaml",
                  reports_root=tmp_path / "reports")
    assert "partly executed notebook" in str(err.value)
    assert not (tmp_path / "reports" / "smoke" / "04_classifier_experiments.html").exists()


def test_importing_the_package_has_no_side_effect():
    """``import cxrlib`` loads no other module and so changes no process-wide setting (it once
    tuned glibc's malloc for the whole process; measured at 2.6% here, it was removed)."""
    probe = ("import sys; before = set(sys.modules); import cxrlib; "
             "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "['cxrlib']"


def test_set_overrides_reach_every_stage_and_the_index(tmp_path, monkeypatch):
    """``cxrlib run --set KEY=VALUE``: values read as YAML, a malformed item named, and the
    overrides passed to each notebook as its ``overrides`` parameter (papermill stubbed: the
    stage records what it was given instead of executing)."""
    assert parse_overrides(["sampling.steps=25", "run.name=demo-sde", "x.y=[0, 1.5]"]) == {
        "sampling.steps": 25, "run.name": "demo-sde", "x.y": [0, 1.5]}
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        parse_overrides(["sampling.steps"])
    given = []

    def fake(source, dest, **kwargs):
        given.append(kwargs["parameters"])
        nbformat.write(nbformat.v4.new_notebook(), dest)

    monkeypatch.setattr(notebook_runner.papermill, "execute_notebook", fake)
    monkeypatch.setattr(notebook_runner, "render_html", lambda executed, page, *_: page)
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path / "runs"))
    overrides = parse_overrides(["run.name=smoke-variant", "sampling.steps=2"])
    index = run_pipeline(ROOT / "params" / "smoke.yaml", ("01_data_prep",), quiet=True,
                         reports_root=tmp_path / "reports", overrides=overrides)
    assert given == [{"params_file": str((ROOT / "params" / "smoke.yaml").resolve()),
                      "progress": True, "overrides": overrides}]
    run = RunLayout.open(load_params(ROOT / "params" / "smoke.yaml", overrides))
    assert json.loads(run.params.read_text())["sampling"]["steps"] == 2
    assert "with <code>run.name: &quot;smoke-variant&quot;</code>" in index.read_text()
    assert main(["run", "--params", str(ROOT / "params" / "smoke.yaml"), "--set",
                 "sampling.stepz=2"]) == 2  # an unknown key fails before any work


def test_a_rendered_page_drops_stderr_paths_and_empty_sections():
    """What the runner shows of an executed notebook: no stderr box (progress bars,
    warnings), no path of the machine that rendered it, no section whose cell showed
    nothing, and a stage's summary moved under its title; the executed notebook keeps all."""
    from cxrlib.notebook_runner import IF_OUTPUT_TAG, REPORT_TOP_TAG, readable_notebook

    v4 = nbformat.v4
    nb = v4.new_notebook(cells=[
        v4.new_markdown_cell("# Title"),
        v4.new_code_cell("work()", outputs=[
            v4.new_output("stream", name="stderr", text="steps: 32% 52/160\n"),
            v4.new_output("stream", name="stdout", text=f"model: {ROOT}/runs/demo/step-1\n")]),
        v4.new_markdown_cell("## Dose-response", metadata={"tags": [IF_OUTPUT_TAG]}),
        v4.new_code_cell("None", outputs=[]),
        v4.new_markdown_cell("## Kept", metadata={"tags": [IF_OUTPUT_TAG]}),
        v4.new_code_cell("1", outputs=[v4.new_output("execute_result", {"text/plain": "1"})]),
        v4.new_code_cell("summary()", metadata={"tags": [REPORT_TOP_TAG]}),
    ])
    shown = readable_notebook(nb, ROOT)
    sources = [c.source for c in shown.cells]
    assert sources == ["# Title", "summary()", "work()", "None", "## Kept", "1"]
    assert shown.cells[2].outputs == [v4.new_output("stream", name="stdout",
                                                    text="model: runs/demo/step-1\n")]
    assert len(nb.cells) == 7 and len(nb.cells[1].outputs) == 2  # the notebook is untouched


def test_a_shown_table_computes_like_the_frame_and_displays_for_people(tmp_path, monkeypatch):
    """``Outputs.table`` saves identifiers at full precision and returns the same frame
    (attrs included), displayed with labels, no index and 3 decimals."""
    from cxrlib.core.outputs import Outputs

    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path / "runs"))
    run = RunLayout.open(load_params(ROOT / "params" / "smoke.yaml"))
    out = Outputs(run, "05_statistics")
    out.labels.update({"real_only.f5": "5% real only"})
    frame = pd.DataFrame({"experiment": ["real_only.f5"], "delta": [0.012345], "p": [0.0002]})
    frame.attrs["parameters"] = 7
    shown = out.table(frame, "t")
    assert shown.attrs["parameters"] == 7 and shown["delta"].iloc[0] == 0.012345
    assert type(shown[["delta"]]) is pd.DataFrame  # derived frames are plain
    page = shown._repr_html_()
    assert "5% real only" in page and "+0.012" in page and "&lt; 0.001" in page
    assert "real_only.f5" not in page and "<th></th>" not in page  # no index column
    assert "real_only.f5" in (out.folder / "t.csv").read_text()
    assert "0.012345" in (out.folder / "t.csv").read_text()
    said = out.say(["real_only.f5 beat nothing."], "s")
    assert said._repr_html_() == "<p>5% real only beat nothing.</p>"
    assert (out.folder / "s.txt").read_text() == "5% real only beat nothing.\n"
    out.finish()


def test_provenance_names_the_commit_and_ignores_rendered_reports(tmp_path):
    """A page's commit is dirty when code or parameters differ from it, not because the run
    re-rendered the committed reports."""
    from cxrlib.core.provenance import commit

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "index.html").write_text("old")
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    assert commit(tmp_path)["dirty"] is False
    (tmp_path / "reports" / "index.html").write_text("re-rendered")
    assert commit(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit(tmp_path)["dirty"] is True and len(commit(tmp_path)["commit"]) == 12
    assert commit(tmp_path / "reports" / "nowhere")["commit"].startswith("unknown")
