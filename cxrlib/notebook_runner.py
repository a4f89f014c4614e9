"""Headless execution of the numbered notebooks with papermill, into the run folder.

``python -m cxrlib run --params params/demo.yaml`` executes each notebook with the parameter
file injected, writes the executed copy to ``<run>/notebooks/``, and renders it to HTML (code
hidden) under ``reports/<run name>/``. A failing notebook stops the chain and names the cell.
The notebooks' own output (messages, progress bars) streams to the terminal while they run,
unless ``quiet``; each stage ends with one line: its time and where its HTML went. Each
stage runs under the run's one-writer lock, after the earlier stages' files were checked
against their records, and is recorded when it finishes (:func:`cxrlib.core.records.writing`).
Afterwards the stage times and the precision each stage trained in go into the run's
``summary.json``, which is copied beside the HTML.
"""

from __future__ import annotations

import html
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbconvert import HTMLExporter

from cxrlib.core.config import Overrides, load_params
from cxrlib.core.files import atomic_write_text
from cxrlib.core.layout import STAGES, RunLayout
from cxrlib.core.lock import hold
from cxrlib.core.progress import PROGRESS_ENV
from cxrlib.core.records import writing
from cxrlib.core.summary import (
    NESTED,
    PRIMARY_KEYS,
    SCHEMA,
    read_summary,
    stage_precisions,
    update_summary,
)

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def render_html(executed: Path, dest: Path) -> Path:
    """Executed notebook -> standalone HTML with the code cells hidden."""
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, body)
    return dest


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (kernels started there inherit it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _execute(source: Path, dest: Path, params_file: Path, quiet: bool,
             overrides: Overrides = None) -> None:
    """Papermill: the cell counter alone when ``quiet``, else the kernel's stdout and stderr
    streamed to ours, with cxrlib's progress bars drawn for a terminal or a log as ours is."""
    parameters: dict[str, Any] = {"params_file": str(params_file.resolve()), "progress": True}
    if overrides:
        parameters["overrides"] = overrides
    kwargs: dict[str, Any] = {
        "cwd": str(NOTEBOOKS_DIR), "kernel_name": "python3", "parameters": parameters,
    }
    if quiet:
        papermill.execute_notebook(str(source), str(dest), progress_bar=True, **kwargs)
        return
    mode = "terminal" if sys.stderr.isatty() else "log"
    with _environment(PROGRESS_ENV, mode):
        # coalesce_streams: the saved notebook keeps each bar's last state, not every redraw
        papermill.execute_notebook(str(source), str(dest), progress_bar=False,
                                   stdout_file=sys.stdout, stderr_file=sys.stderr,
                                   coalesce_streams=True, **kwargs)


def run_stage(stage: str, params_file: Path, reports_root: Path | None = None,
              force: bool = False, quiet: bool = False, overrides: Overrides = None) -> Path:
    """Execute one notebook for a parameter file (and ``overrides``, dotted keys over it);
    returns the executed notebook's path."""
    run = RunLayout.open(load_params(params_file, overrides))
    executed = run.executed(stage)
    if executed.exists() and not force:
        print(f"[skip] {stage}: already executed ({executed}); use --force to run it again")
        return executed
    executed.parent.mkdir(parents=True, exist_ok=True)
    partial = executed.with_name(f".{stage}.running.ipynb")
    with writing(run, stage):  # the kernel writes under this process's lock
        print(f"[run] {stage} -> {executed}", flush=True)
        try:
            _execute(NOTEBOOKS_DIR / f"{stage}.ipynb", partial, params_file, quiet, overrides)
        except papermill.PapermillExecutionError as err:
            raise SystemExit(
                f"{stage} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"The partly executed notebook is {partial}"
            ) from None
        partial.replace(executed)
    page = render_html(executed, run.reports(reports_root) / f"{stage}.html")
    secs = stage_seconds(executed)
    took = f"{secs / 60:.1f} min" if secs is not None else "time not recorded"
    print(f"[done] {stage}: {took}; report {page}", flush=True)
    return executed


#: What each report page shows (the index page's descriptions).
STAGE_TITLES: dict[str, str] = {
    "01_data_prep": "Data preparation: sources, dropped rows, demographics, labels, "
                    "learnability check",
    "02_diffusion_training": "Conditional diffusion model: architecture, schedule, training "
                             "curves, previews, conditioning check",
    "03_sampling_explorer": "Sampling explorer, synthetic cohorts and their audit (distance, "
                            "fidelity, diversity, memorization, guidance sweep)",
    "04_classifier_experiments": "Classifier experiment grid: training sets, learning curves, "
                                 "epochs to early stop, first look at AUROC",
    "05_statistics": "Statistics: AUROC with patient-bootstrap CIs, DeLong and bootstrap tests "
                     "against the baseline, subgroups, generated findings",
}


def stage_seconds(executed: Path) -> float | None:
    """Wall-clock seconds papermill recorded for an executed notebook."""
    meta = nbformat.read(executed, as_version=4).metadata.get("papermill", {})
    return meta.get("duration")


def record_stage_times(run: RunLayout, reports_root: Path | None = None) -> dict[str, Any]:
    """Every executed stage's minutes (papermill's recorded durations) and the precision
    each trained in (:func:`cxrlib.core.summary.stage_precisions`) into the run's ``summary.json``,
    then the summary copied (atomically) to ``reports/<run>/``."""
    minutes = {}
    for stage in STAGES:
        executed = run.executed(stage)
        secs = stage_seconds(executed) if executed.exists() else None
        if secs is not None:
            minutes[stage] = round(secs / 60, 2)
    summary = update_summary(run, minutes_total=round(sum(minutes.values()), 2),
                             minutes_per_stage=minutes, precision=stage_precisions(run))
    reports = run.reports(reports_root)
    reports.mkdir(parents=True, exist_ok=True)
    atomic_write_text(reports / run.summary.name, run.summary.read_text())
    return summary


def _number(value: Any) -> str:
    """A table cell: floats to 3 significant digits without an exponent (a CI bound of
    -7.66e-05 reads -0.0001; below 0.0001 it is 0.0000), booleans as yes/no, missing as -."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, float):
        return html.escape(str(value))
    text = f"{value:.3g}"
    if "e" not in text:
        return text
    return f"{value:.4f}" if abs(value) < 1 else f"{value:,.0f}"


def _rows_html(title: str, rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """A titled table of ``rows`` with the columns ``keys`` (empty when there are no rows)."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in keys)
    body = "".join("<tr>" + "".join(f"<td>{_number(r.get(c))}</td>" for c in keys) + "</tr>"
                   for r in rows)
    return f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>"


#: The columns of the index page's tables: what fits a page (summary.json keeps the rest).
_CLAIM_COLUMNS = ("claim", "test_set", "tested", "delta", "ci_low", "ci_high", "mde",
                  "verdict", "exchange rate (CI)")
_CHECK_COLUMNS = ("check", "experiment", "test_set", "expected", "delta", "ci_low",
                  "ci_high", "verdict", "held")
_RATE_COLUMNS = ("experiment", "rate", "ci_low", "ci_high", "extrapolated")


def _rate_cell(claim: dict[str, Any]) -> str | None:
    """A claim's exchange rate in one cell, ``0.204 (0.112 to 0.296)``, marked where it lies
    beyond the learning curve; None (shown as -) where the claim has none."""
    def given(key: str) -> bool:  # None in summary.json, NaN in a claims table
        return claim.get(key) is not None and claim[key] == claim[key]

    if not given("exchange_rate"):
        return None
    rate, low, high = (claim.get(k) for k in ("exchange_rate", "exchange_ci_low",
                                               "exchange_ci_high"))
    ci = (f" ({_number(low)} to {_number(high)})"
          if given("exchange_ci_low") and given("exchange_ci_high") else "")
    return f"{_number(rate)}{ci}" + (", extrapolated" if claim.get("exchange_extrapolated") else "")


def summary_html(summary: dict[str, Any], link: str) -> str:
    """The answer first (the paper's claims, the manipulation checks, the exchange rate on
    the headline test set), then the summary's key numbers (its schema's scalar and nested
    entries) and the primary comparisons, as HTML; stage times are in the list of pages."""
    rows = [(key, summary[key]) for key, kind in SCHEMA.items()
            if kind not in (dict, list) and key in summary]
    rows += [(f"{key}.{sub}", summary[key][sub]) for key, inner in NESTED.items()
             for sub in inner if sub in (summary.get(key) or {})]
    if not rows:
        return ""
    rates = [{"experiment": arm, **entry}
             for arm, entry in (summary.get("exchange_rate") or {}).items()]
    claims = [{**c, "exchange rate (CI)": _rate_cell(c)} for c in summary.get("claims") or []]
    answer = (_rows_html("The paper's claims", claims, _CLAIM_COLUMNS)
              + _rows_html("Manipulation checks (positive and negative controls)",
                           summary.get("manipulation_checks") or [], _CHECK_COLUMNS)
              + _rows_html("Exchange rate (internal test set): real images one extra image "
                           "is worth", rates, _RATE_COLUMNS))
    cells = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{_number(v)}</td></tr>"
                    for k, v in rows)
    return (f"<h2>What the run found</h2><p>From <a href='{link}'>{link}</a>.</p>{answer}"
            f"<h2>Key numbers</h2><table>{cells}</table>"
            + _rows_html("Primary comparisons", summary.get("primary") or [], PRIMARY_KEYS))


def render_index(params_file: Path, reports_root: Path | None = None,
                 overrides: Overrides = None) -> Path:
    """``reports/<run>/index.html``: a link per rendered stage with its run time and the
    precision it trained in, and the run summary's headline numbers."""
    params = load_params(params_file, overrides)
    changed = "".join(f", <code>{html.escape(k)}: {html.escape(json.dumps(v))}</code>"
                      for k, v in (overrides or {}).items())
    run = RunLayout.open(params)
    reports = run.reports(reports_root)
    summary = read_summary(run)
    precision = summary.get("precision", {})
    items, total = [], 0.0
    for stage in STAGES:
        if not (reports / f"{stage}.html").exists():
            continue
        executed = run.executed(stage)
        secs = stage_seconds(executed) if executed.exists() else None
        total += secs or 0.0
        notes = [f"{secs / 60:.1f} min"] if secs else []
        if stage in precision:
            notes.append(html.escape(precision[stage]))
        took = f" ({'; '.join(notes)})" if notes else ""
        items.append(f'<li><a href="{stage}.html">{html.escape(stage)}</a>{took}: '
                     f"{html.escape(STAGE_TITLES[stage])}</li>")
    body = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxrlib report: "
            f"{html.escape(params.run.name)}</title><style>td,th{{padding:0 .8em 0 0;"
            f"text-align:left}}</style></head><body style='font-family:sans-serif;"
            f"max-width:60em;margin:2em auto'><h1>Run <code>{html.escape(params.run.name)}"
            f"</code></h1><p>Parameter file: <code>{html.escape(params_file.name)}</code>"
            f"{' with ' + changed[2:] if changed else ''}. "
            f"Notebooks executed headless with papermill; code hidden. Total notebook time "
            f"{total / 60:.1f} min.</p><ol>{''.join(items)}</ol>"
            f"{summary_html(summary, run.summary.name)}<h2>Parameters</h2><pre>"
            f"{html.escape(params.to_json())}</pre></body></html>")
    dest = reports / "index.html"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, body)
    return dest


def run_pipeline(params_file: Path, stages: tuple[str, ...] = STAGES, force: bool = False,
                 reports_root: Path | None = None, quiet: bool = False,
                 overrides: Overrides = None) -> Path:
    """Run the given stages in order (a failure stops the chain), record the stage times in
    the run's summary, then write the index page. ``overrides`` (dotted keys, e.g.
    ``{"run.name": "demo-sde", "sampling.sampler": "sde_dpmpp"}``) change the parameter file
    for every stage: a variant of a preset without a copy of it."""
    for stage in stages:
        run_stage(stage, params_file, reports_root, force=force, quiet=quiet,
                  overrides=overrides)
    run = RunLayout.open(load_params(params_file, overrides))
    with hold(run, "stage times"):
        summary = record_stage_times(run, reports_root)
    print(f"[summary] {run.reports(reports_root) / run.summary.name}: "
          f"{summary['minutes_total']:.1f} min of notebooks")
    index = render_index(params_file, reports_root, overrides)
    print(f"[index] {index}")
    return index
