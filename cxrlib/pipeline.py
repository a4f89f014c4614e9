"""Headless execution of the numbered notebooks with papermill, into the run folder.

``python -m cxrlib run --params params/demo.yaml`` executes each notebook with the parameter
file injected, writes the executed copy to ``<run>/notebooks/``, and renders it to HTML (code
hidden) under ``reports/<run name>/``. A failing notebook stops the chain and names the cell.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
from nbconvert import HTMLExporter

from cxrlib.config import load_params, run_dir

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
STAGES: tuple[str, ...] = ("01_data_prep", "02_diffusion_training", "03_sampling_explorer")


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


def run_pipeline(params_file: Path, stages: tuple[str, ...] = STAGES, force: bool = False) -> None:
    """Run the given stages in order; a failure stops the chain."""
    for stage in stages:
        run_stage(stage, params_file, force=force)
