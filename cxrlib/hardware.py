"""Which numeric precision a device runs fastest: one decision for every trainer.

``mixed_precision: auto`` resolves here. On CUDA it is bf16 where the GPU supports it, else
fp16. On a CPU it is bf16 autocast only when the CPU has bf16 units (Intel AMX or
AVX512-BF16, where oneDNN has native bf16 convolution and matmul kernels), and plain fp32
elsewhere, where bf16 is emulated and slower. Whether bf16 pays off on a given CPU and model
is measured by ``benchmarks/bench_diffusion_trainer.py`` (on the demo's 32 px UNet on a
2-core AVX512-BF16 machine without AMX it did not reliably; see the README). fp16 autocast on
a CPU has no fast kernels, so it falls back to fp32 too.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: /proc/cpuinfo flags of CPU units that compute in bf16.
BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The bf16 units this CPU reports (empty where there are none or nothing can be read)."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return ()
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def resolve_precision(requested: str, cuda: bool | None = None) -> str:
    """Accelerate's ``mixed_precision`` (``no``, ``fp16`` or ``bf16``) for a requested one
    (``no``, ``fp16``, ``bf16`` or ``auto``) on this machine."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        if requested != "auto":
            return requested
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested in ("auto", "bf16") and cpu_bf16_units():
        return "bf16"
    return "no"


def describe_precision(requested: str, resolved: str) -> str:
    """One log line: what was asked, what runs, and why."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    units = ", ".join(cpu_bf16_units()) or "none"
    why = f"CPU bf16 units: {units}" if device == "cpu" else "GPU"
    name = {"no": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[resolved]
    return f"precision: {name} on {device} (asked: {requested}; {why})"
