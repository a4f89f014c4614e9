"""Headless execution of the numbered notebooks with papermill, into the run folder.

``python -m cxrlib run --params params/demo.yaml`` executes each notebook with the parameter
file injected, writes the executed copy to ``<run>/notebooks/``, and renders it to HTML (code
hidden) under ``reports/<run name>/``. A failing notebook stops the chain and names the cell.
"""

from __future__ import annotations

import html
from pathlib import Path

import nbformat
import papermill
from nbconvert import HTMLExporter

from cxrlib.config import load_params, run_dir

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
STAGES: tuple[str, ...] = ("01_data_prep", "02_diffusion_training", "03_sampling_explorer",
                           "04_classifier_experiments", "05_statistics")


def render_html(executed: Path, dest: Path) -> Path:
    """Executed notebook -> standalone HTML with the code cells hidden."""
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(dest)
    return dest


def run_stage(stage: str, params_file: Path, reports_root: Path | None = None,
              force: bool = False) -> Path:
    """Execute one notebook for a parameter file; returns the executed notebook's path."""
    params = load_params(params_file)
    folder = run_dir(params)
    executed = folder / "notebooks" / f"{stage}.ipynb"
    if executed.exists() and not force:
        print(f"[skip] {stage}: already executed ({executed}); use --force to run it again")
        return executed
    executed.parent.mkdir(parents=True, exist_ok=True)
    partial = executed.with_name(f".{stage}.running.ipynb")
    source = NOTEBOOKS_DIR / f"{stage}.ipynb"
    print(f"[run] {stage} -> {executed}")
    try:
        papermill.execute_notebook(
            str(source), str(partial), cwd=str(NOTEBOOKS_DIR), kernel_name="python3",
            parameters={"params_file": str(params_file.resolve()), "progress": True},
            progress_bar=True,
        )
    except papermill.PapermillExecutionError as err:
        raise SystemExit(
            f"{stage} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
            f"The partly executed notebook is {partial}"
        ) from None
    partial.replace(executed)
    reports = (reports_root or NOTEBOOKS_DIR.parent / "reports") / params.run.name
    html = render_html(executed, reports / f"{stage}.html")
    print(f"[html] {html}")
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


def render_index(params_file: Path, reports_root: Path | None = None) -> Path:
    """``reports/<run>/index.html``: a link per rendered stage, with its run time."""
    params = load_params(params_file)
    reports = (reports_root or NOTEBOOKS_DIR.parent / "reports") / params.run.name
    executed_dir = run_dir(params) / "notebooks"
    items, total = [], 0.0
    for stage in STAGES:
        if not (reports / f"{stage}.html").exists():
            continue
        executed = executed_dir / f"{stage}.ipynb"
        secs = stage_seconds(executed) if executed.exists() else None
        total += secs or 0.0
        took = f" ({secs / 60:.1f} min)" if secs else ""
        items.append(f'<li><a href="{stage}.html">{html.escape(stage)}</a>{took}: '
                     f"{html.escape(STAGE_TITLES[stage])}</li>")
    body = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxrlib report: "
            f"{html.escape(params.run.name)}</title></head><body style='font-family:sans-serif;"
            f"max-width:60em;margin:2em auto'><h1>Run <code>{html.escape(params.run.name)}"
            f"</code></h1><p>Parameter file: <code>{html.escape(params_file.name)}</code>. "
            f"Notebooks executed headless with papermill; code hidden. Total notebook time "
            f"{total / 60:.1f} min.</p><ol>{''.join(items)}</ol><h2>Parameters</h2><pre>"
            f"{html.escape(params.to_json())}</pre></body></html>")
    dest = reports / "index.html"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(dest)
    return dest


def run_pipeline(params_file: Path, stages: tuple[str, ...] = STAGES, force: bool = False,
                 reports_root: Path | None = None) -> Path:
    """Run the given stages in order (a failure stops the chain), then write the index page."""
    for stage in stages:
        run_stage(stage, params_file, reports_root, force=force)
    index = render_index(params_file, reports_root)
    print(f"[index] {index}")
    return index
