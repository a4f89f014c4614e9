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
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import papermill
from nbconvert import HTMLExporter

from cxrlib.core.config import Overrides, load_params, params_base
from cxrlib.core.files import atomic_path, atomic_write_text
from cxrlib.core.layout import STAGES, WORTH_STAGE, RunLayout, stages_of
from cxrlib.core.lock import hold
from cxrlib.core.progress import PROGRESS_ENV
from cxrlib.core.provenance import header_html, provenance
from cxrlib.core.records import writing
from cxrlib.core.summary import read_summary, stage_precisions, update_summary
from cxrlib.core.vocabulary import readable, with_labels
from cxrlib.study.figures import FOREST_FIGURE
from cxrlib.study.findings import control_held, headline, summary_names

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


#: A cell tagged so is moved right under the page's title in the rendered HTML: a stage's
#: summary computed at its end (notebook 03's audit), read first.
REPORT_TOP_TAG = "report-top"
#: A markdown cell tagged so introduces the code cell after it and is left off the page when
#: that cell showed nothing (a section whose table is empty in this run).
IF_OUTPUT_TAG = "if-output"
#: Styles every rendered page shares: tables that wrap instead of overflowing the page.
PAGE_CSS = """<style>
.jp-RenderedHTMLCommon table, table.dataframe {font-size: 12px; table-layout: auto;
  max-width: 100%; border-collapse: collapse}
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th {white-space: normal !important;
  max-width: 24em; overflow-wrap: normal; text-align: left !important; vertical-align: top}
.jp-OutputArea-output pre {white-space: pre-wrap; word-break: normal; overflow-wrap: normal}
</style>"""


def readable_notebook(nb: nbformat.NotebookNode, project: Path) -> nbformat.NotebookNode:
    """The executed notebook as a collaborator reads it: stderr (progress bars, warnings)
    dropped, this machine's project path cut from every printed path, sections with nothing
    to show left off (:data:`IF_OUTPUT_TAG`), and the cells tagged :data:`REPORT_TOP_TAG`
    moved under the title. The executed notebook itself keeps all."""
    prefix = str(project.resolve()) + os.sep
    out = nbformat.from_dict(nb)
    for cell in out.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                continue
            if "text" in output:
                output["text"] = output["text"].replace(prefix, "")
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    output["data"][kind] = value.replace(prefix, "")
            kept.append(output)
        cell["outputs"] = kept
    def tagged(cell: nbformat.NotebookNode, tag: str) -> bool:
        return tag in cell.get("metadata", {}).get("tags", [])

    out.cells = [c for i, c in enumerate(out.cells)
                 if not (tagged(c, IF_OUTPUT_TAG) and i + 1 < len(out.cells)
                         and not out.cells[i + 1].get("outputs"))]
    top = [c for c in out.cells if tagged(c, REPORT_TOP_TAG)]
    if top:
        rest = [c for c in out.cells if c not in top]
        out.cells = rest[:1] + top + rest[1:]
    return out


def render_html(executed: Path, dest: Path, header: str = "",
                project: Path | None = None) -> Path:
    """Executed notebook -> standalone HTML with the code cells hidden, the provenance
    ``header`` (:func:`cxrlib.core.provenance.header_html`) on top and the notebook made
    readable (:func:`readable_notebook`)."""
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    nb = nbformat.read(executed, as_version=4)
    if project is not None:
        nb = readable_notebook(nb, project)
    body, _ = exporter.from_notebook_node(nb)
    body = body.replace("</head>", PAGE_CSS + "</head>", 1)
    if header:
        start = body.index(">", body.index("<body")) + 1
        body = body[:start] + f"<div style='max-width:1200px;margin:8px auto'>{header}</div>" \
            + body[start:]
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
    params = load_params(params_file, overrides)
    run = RunLayout.open(params)
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
    page = render_html(executed, run.reports(reports_root) / f"{stage}.html",
                       header_html(provenance(params, params_file)), params_base(params))
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
    "06_worth_curves": "Worth curves: what an extra image is worth in real images against "
                       "generator compute, guidance, dose and real-data size; which cheap "
                       "measure predicts it",
}


def stage_seconds(executed: Path) -> float | None:
    """Wall-clock seconds papermill recorded for an executed notebook."""
    meta = nbformat.read(executed, as_version=4).metadata.get("papermill", {})
    return meta.get("duration")


def record_stage_times(run: RunLayout, reports_root: Path | None = None,
                       fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every executed stage's minutes (papermill's recorded durations) and the precision
    each trained in (:func:`cxrlib.core.summary.stage_precisions`) into the run's ``summary.json``
    with the run's provenance ``fields`` (:func:`cxrlib.core.provenance.provenance`), then the
    summary copied (atomically) to ``reports/<run>/``."""
    minutes = {}
    for stage in STAGES:
        executed = run.executed(stage)
        secs = stage_seconds(executed) if executed.exists() else None
        if secs is not None:
            minutes[stage] = round(secs / 60, 2)
    extra = {"provenance": fields} if fields else {}
    summary = update_summary(run, minutes_total=round(sum(minutes.values()), 2),
                             minutes_per_stage=minutes, precision=stage_precisions(run),
                             **extra)
    reports = run.reports(reports_root)
    reports.mkdir(parents=True, exist_ok=True)
    atomic_write_text(reports / run.summary.name, run.summary.read_text())
    return summary


def _table(title: str, rows: list[dict[str, Any]], columns: dict[str, str],
           names: dict[str, str], note: str = "") -> str:
    """A titled table of ``rows``: ``columns`` maps a row key to its header; identifiers in
    ``names`` shown as their labels, numbers as :func:`cxrlib.core.vocabulary.readable` does;
    nothing when there are no rows."""
    if not rows:
        return ""
    frame = readable(pd.DataFrame(rows).reindex(columns=list(columns)), names)
    frame.columns = list(columns.values())
    table = frame.to_html(index=False, escape=True, border=0, na_rep="-")
    return f"<h2>{html.escape(title)}</h2>{f'<p>{note}</p>' if note else ''}{table}"


def _claim_rows(summary: dict[str, Any], names: dict[str, str]) -> list[dict[str, Any]]:
    """The claims of the summary as the landing page shows them: the CI in one cell, the
    exchange rate with its CI, and whether the perfect-generator control showed its gain on
    the same test set (a claim there is read against it)."""
    held = control_held(summary)
    baseline = {p["test_set"]: p["baseline"] for p in summary.get("primary") or []}
    def given(row: dict[str, Any], *keys: str) -> bool:  # None in summary.json, NaN in a table
        return all(row.get(k) is not None and row[k] == row[k] for k in keys)

    rows = []
    for c in summary.get("claims") or []:
        worth = "-"
        if given(c, "exchange_rate"):
            worth = f"{c['exchange_rate']:.3f}" + (
                f" ({c['exchange_ci_low']:.3f} to {c['exchange_ci_high']:.3f})"
                if given(c, "exchange_ci_low", "exchange_ci_high") else "") + (
                ", extrapolated" if c.get("exchange_extrapolated") else "")
        ci = (f"{c['ci_low']:+.3f} to {c['ci_high']:+.3f}" if given(c, "ci_low", "ci_high")
              else "-")
        test_set = c.get("test_set")
        rows.append({**c, "tested": with_labels(str(c.get("tested", "")), names), "ci": ci,
                     "worth": worth, "control": held.get((test_set, baseline.get(test_set)))})
    return rows


def _generator_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The generator's audit numbers of the summary, one row each, with what they mean."""
    rows = []
    fidelity = summary.get("fidelity") or {}
    if fidelity:
        rows.append({"measure": "conditional fidelity (synthetic / real judge AUROC)",
                     "value": fidelity.get("ratio"),
                     "meaning": "1: the conditioned labels read as well as on real images"})
    for key, measure, meaning in (
            ("texture_hf_ratio", "high-frequency power, synthetic / real",
             "1: real texture; below 1: smoother than real"),
            ("detectability_auroc", "real-versus-synthetic classifier AUROC",
             "0.5: indistinguishable from real; 1: always told apart")):
        entry = summary.get(key) or {}
        if entry:
            rows.append({"measure": measure, "value": entry.get("value"),
                         "ci": f"{entry.get('ci_low', float('nan')):.3f} to "
                               f"{entry.get('ci_high', float('nan')):.3f}",
                         "meaning": meaning})
    return rows


def summary_html(summary: dict[str, Any], forest: str = "") -> str:
    """The landing page's answer: the headline sentences, the forest plot (``forest``, a
    file beside the page), the paper's claims, the manipulation checks, what an extra image
    is worth, and the generator's audit; identifiers shown as their labels."""
    names = summary_names(summary)
    parts = [f"<p style='font-size:17px;line-height:1.5'>{html.escape(s)}</p>"
             for s in headline(summary)]
    if forest:
        parts.append(f"<img src='{forest}' style='max-width:100%' alt='Differences in macro "
                     "AUROC against real only, per test set, with 95% CIs and MDEs'>")
    parts.append(_table(
        "The paper's claims", _claim_rows(summary, names),
        {"claim": "claim", "test_set": "test set", "tested": "tested by", "delta":
         "difference", "ci": "95% CI", "mde": "detectable (MDE)", "verdict": "verdict",
         "control": "perfect generator's gain there",
         "worth": "real images one extra image is worth"}, names,
        "A claim is <i>supported</i> when its comparison is better after Holm, "
        "<i>contradicted</i> when worse or shown equivalent, else <i>inconclusive</i>: a "
        "difference smaller than the MDE could have been missed."))
    parts.append(_table(
        "Manipulation checks: does the instrument see what it must?",
        summary.get("manipulation_checks") or [],
        {"check": "check", "experiment": "arm", "baseline": "compared with",
         "test_set": "test set", "expected": "expected", "delta": "difference",
         "ci_low": "CI low", "ci_high": "CI high", "held": "held"}, names))
    rates = [{"experiment": arm, **entry}
             for arm, entry in (summary.get("exchange_rate") or {}).items()]
    parts.append(_table(
        "What one extra image is worth, in real images (internal test set)", rates,
        {"experiment": "arm", "rate": "real images per extra image", "ci_low": "CI low",
         "ci_high": "CI high", "extrapolated": "beyond the learning curve"}, names))
    parts.append(_table("The generator", _generator_rows(summary),
                        {"measure": "measure", "value": "value", "ci": "95% CI",
                         "meaning": "reads as"}, names))
    return "".join(parts)


def _copy_beside(figure: Path, reports: Path) -> bool:
    """Copy a run's figure next to the rendered pages (atomically); whether there was one."""
    if not figure.exists():
        return False
    with atomic_path(reports / figure.name) as tmp:
        shutil.copyfile(figure, tmp)
    return True


def _worth_curves_html(run: RunLayout, reports: Path) -> str:
    """The worth curves' answer for the landing page, when the run has them: notebook 06's
    guidance sentences and its figure (copied beside the page)."""
    stage = run.stage(WORTH_STAGE)
    guidance, figure = stage / "guidance.txt", stage / "worth_curves.png"
    if not guidance.exists():
        return ""
    lines = "".join(f"<li>{html.escape(line)}</li>"
                    for line in guidance.read_text().splitlines() if line.strip())
    image = (f"<img src='{figure.name}' alt='worth curves: r with its CI along each axis' "
             "style='max-width:100%'>" if _copy_beside(figure, reports) else "")
    return (f"<h2>What an extra image is worth, and what buys it</h2><ul>{lines}</ul>{image}"
            f"<div style='margin:.5em 0 1em'>Details: <a href='{WORTH_STAGE}.html'>the worth "
            "curves</a>. The study's comparisons follow.</div>")


def render_index(params_file: Path, reports_root: Path | None = None,
                 overrides: Overrides = None) -> Path:
    """``reports/<run>/index.html``, the landing page: provenance, the answer
    (:func:`summary_html`), the stage pages with their run times and precisions, and the
    parameters folded away at the bottom."""
    params = load_params(params_file, overrides)
    changed = "".join(f", <code>{html.escape(k)}: {html.escape(json.dumps(v))}</code>"
                      for k, v in (overrides or {}).items())
    run = RunLayout.open(params)
    reports = run.reports(reports_root)
    reports.mkdir(parents=True, exist_ok=True)
    summary = read_summary(run)
    fields = summary.get("provenance") or provenance(params, params_file)
    precision = summary.get("precision", {})
    forest = _copy_beside(run.stage("05_statistics") / FOREST_FIGURE, reports)
    worth = _worth_curves_html(run, reports)
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
        items.append(f'<li><a href="{stage}.html">{html.escape(STAGE_TITLES[stage])}</a>'
                     f"{took}</li>")
    body = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxrlib report: "
            f"{html.escape(params.run.name)}</title><style>td,th{{padding:2px .8em 2px 0;"
            f"text-align:left;vertical-align:top}}table{{border-collapse:collapse;"
            f"font-size:14px;margin-bottom:1em}}th{{border-bottom:1px solid #999}}"
            f"</style></head><body style='font-family:sans-serif;max-width:1100px;"
            f"margin:1.5em auto;padding:0 1em'>{header_html(fields)}"
            f"<h1>Does synthetic data help the classifiers? Run "
            f"<code>{html.escape(params.run.name)}</code></h1>"
            f"{worth}{summary_html(summary, FOREST_FIGURE if forest else '')}"
            f"<h2>The pages</h2><p>Notebooks executed headless with papermill (code hidden), "
            f"{total / 60:.1f} min in all; the headline numbers are in "
            f"<a href='{run.summary.name}'>{run.summary.name}</a>.</p><ol>{''.join(items)}</ol>"
            f"<details><summary>Parameters: <code>{html.escape(params_file.name)}</code>"
            f"{' with ' + changed[2:] if changed else ''}</summary><pre>"
            f"{html.escape(params.to_json())}</pre></details></body></html>")
    dest = reports / "index.html"
    atomic_write_text(dest, body)
    return dest


def run_pipeline(params_file: Path, stages: tuple[str, ...] = STAGES, force: bool = False,
                 reports_root: Path | None = None, quiet: bool = False,
                 overrides: Overrides = None) -> Path:
    """Run the given stages in order (a failure stops the chain), record the stage times in
    the run's summary, then write the index page. ``overrides`` (dotted keys, e.g.
    ``{"run.name": "demo-sde", "sampling.sampler": "sde_dpmpp"}``) change the parameter file
    for every stage: a variant of a preset without a copy of it."""
    params = load_params(params_file, overrides)
    for stage in stages:
        if stage not in stages_of(params):
            print(f"[skip] {stage}: this run has no worth curves (no tradeoffs section)")
            continue
        run_stage(stage, params_file, reports_root, force=force, quiet=quiet,
                  overrides=overrides)
    run = RunLayout.open(params)
    with hold(run, "stage times"):
        summary = record_stage_times(run, reports_root, provenance(params, params_file))
    print(f"[summary] {run.reports(reports_root) / run.summary.name}: "
          f"{summary['minutes_total']:.1f} min of notebooks")
    index = render_index(params_file, reports_root, overrides)
    print(f"[index] {index}")
    return index
