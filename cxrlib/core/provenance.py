"""Where a run's results come from: its images (phantoms or a real reader), when it was
rendered, from which commit, on which machine, with which parameter file.

Every rendered page carries it as a header (:func:`header_html`) and ``summary.json`` keeps
the same fields (``provenance``), so a page forwarded without its folder still says that its
images are phantoms, or which data they were. No torch here: the GPU is read with
``nvidia-smi`` where there is one.
"""

from __future__ import annotations

import html
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrlib.core.config import params_base
from cxrlib.core.layout import REPORTS_DIR
from cxrlib.core.schema import Params
from cxrlib.core.vocabulary import image_source, site_label

#: CPU flags that decide a timing here (bf16 units, AMX tiles, AVX-512, AVX2).
_CPU_FLAGS = ("amx_tile", "avx512_bf16", "avx512f", "avx2")


def _git(root: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def commit(root: Path) -> dict[str, Any]:
    """The checkout's commit (short hash) and whether tracked files other than the rendered
    reports differ from it; an unknown commit where ``root`` is not a git checkout."""
    head = _git(root, "rev-parse", "--short=12", "HEAD")
    if head is None:
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    # the rendered reports are tracked too, and rendering rewrites them: not a change of code
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                   f":(exclude){REPORTS_DIR}")
    return {"commit": head, "dirty": bool(changed)}


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``AMD EPYC, 2 cores, avx512_bf16 avx512f avx2; GPU: none``: the CPU model, its core
    count, the flags that decide its speed, and the GPUs ``nvidia-smi`` lists."""
    model, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    shown = " ".join(f for f in _CPU_FLAGS if f in flags) or "no AVX2"
    gpus = "none"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        gpus = ", ".join(names) if out.returncode == 0 and names else "none"
    return f"{model}, {os.cpu_count()} cores, {shown}; GPU: {gpus}"


def provenance(params: Params, params_file: Path | str | None = None) -> dict[str, Any]:
    """The fields of a page's header and of ``summary.json``'s ``provenance``."""
    project = params_base(params)
    source = Path(params_file) if params_file else params._source
    shown_file = "-"
    if source is not None:
        source = Path(source).resolve()
        shown_file = (str(source.relative_to(project)) if source.is_relative_to(project)
                      else source.name)
    sites = {f"{site_label(s)} ({s.role})": image_source(s) for s in params.data.sites}
    return {
        "images": sites,
        "phantoms": all(s.reader == "phantom" for s in params.data.sites),
        "rendered": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **commit(project),
        "machine": machine(),
        "params_file": shown_file,
        "run": params.run.name,
    }


def header_html(fields: dict[str, Any]) -> str:
    """The provenance header of a rendered page: what the images are, in bold when they are
    phantoms, then when, which commit, which machine and parameter file."""
    if fields.get("phantoms"):
        lead = ("<b>Phantom data, not X-ray images.</b> Every image in this report is a "
                "procedural phantom drawn from a real dataset's label rows; its numbers show "
                "that the method works, not how much synthetic data helps on radiographs.")
    else:
        lead = "<b>Images:</b> real data read by the sites' readers."
    sites = "; ".join(f"{html.escape(k)}: {html.escape(v)}"
                      for k, v in fields.get("images", {}).items())
    dirty = " (with uncommitted changes)" if fields.get("dirty") else ""
    return (
        "<div class='cxr-provenance' style='font-family:sans-serif;font-size:13px;"
        "background:#fff8e1;border:1px solid #e0c068;padding:8px 12px;margin:0 0 16px'>"
        f"{lead}<br><b>Sites:</b> {sites}<br>"
        f"<b>Run</b> {html.escape(str(fields.get('run', '')))}, parameter file "
        f"{html.escape(str(fields.get('params_file', '')))}; rendered "
        f"{html.escape(str(fields.get('rendered', '')))} from commit "
        f"{html.escape(str(fields.get('commit', '')))}{dirty} on "
        f"{html.escape(str(fields.get('machine', '')))}.</div>")
