"""Which numeric precision a device runs fastest, and which optimizer kernel: one decision
for every trainer.

``mixed_precision: auto`` resolves here (:func:`resolve_precision`). On CUDA it is bf16 where
the GPU supports it, else fp16. On a CPU it is bf16 autocast only when the CPU has bf16 units
(Intel AMX or AVX512-BF16, where oneDNN has native bf16 convolution and matmul kernels), and
plain fp32 elsewhere, where bf16 is emulated. fp16 autocast on a CPU has no fast kernels, so it
falls back to fp32 too.

The CPU rule is by measurement: bf16 against fp32 on the kinds of CPU it was measured on
(``benchmarks/bench_diffusion_trainer.py`` for the UNet, demo preset at 32 px, batch 32;
the classifier is timm resnet10t at 32 px, batch 64):

==============================  ==========  ===================================  ==========
CPU (cores; bf16 units)         model       fp32 -> bf16 autocast                ratio
==============================  ==========  ===================================  ==========
Xeon (2; avx512_bf16, no AMX)   UNet        58.5 -> 81.5 img/s (+ channels_last  1.39x
                                            + compile: 92.4, 1.58x)
Xeon (2; avx512_bf16, no AMX),  UNet        158.9 -> 182.3 img/s                 1.15x
  a faster machine                          (reports/benchmarks/diffusion_trainer.txt)
Xeon (2; amx_bf16, avx512_bf16) UNet        107 -> 146 img/s (+ channels_last    1.36x
                                            + compile: 160, 1.49x; issue 20)
Xeon (2; avx512_bf16, no AMX)   classifier  0.153 -> 0.105 s/step, one 5% arm end    1.46x
                                            to end, validation loss 0.318 / 0.320
Xeon (2; amx_bf16, avx512_bf16) classifier  800 -> 750-780 img/s (training step      0.94-0.98x
                                            alone; + channels_last: 870, 1.09x)
==============================  ==========  ===================================  ==========

So bf16 pays off for the UNet on both kinds of CPU with bf16 units and for the classifier on
the one without AMX; on an AMX CPU the classifier's step was as fast in bf16 as in fp32
(``benchmarks/bench_classifier_ttq.py`` measures it end to end, channels_last included).
No CPU without bf16 units has been measured in bf16; there it stays fp32. Every trainer
records what it ran in (:func:`precision_label`), and the run's ``summary.json`` says it per
stage (:func:`cxrlib.core.summary.stage_precisions`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: /proc/cpuinfo flags of CPU units that compute in bf16.
BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
#: What each of Accelerate's ``mixed_precision`` values computes in.
PRECISION_NAMES: dict[str, str] = {"no": "fp32", "fp16": "fp16 autocast",
                                   "bf16": "bf16 autocast"}


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


def precision_label(resolved: str, cuda: bool | None = None) -> str:
    """What a trainer computes in and on what, as its history and the run summary record it:
    ``bf16 autocast (CPU bf16 units: avx512_bf16)``, ``fp32 (GPU: NVIDIA H200)``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    where = (f"GPU: {torch.cuda.get_device_name()}" if cuda
             else f"CPU bf16 units: {', '.join(cpu_bf16_units()) or 'none'}")
    return f"{PRECISION_NAMES[resolved]} ({where})"


def make_optimizer(model: torch.nn.Module, name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """timm's optimizer ``name`` (``adamw`` or ``lion``) over ``model``'s parameters; AdamW
    runs torch's fused kernel (one kernel for all tensors, on CPU and CUDA), the same update
    as the per-tensor loop. That loop was 20% of a demo classifier step on a 2-core CPU
    (16 of 63 ms; fused: 2 ms; ``benchmarks/bench_classifier_ttq.py``) and 7.0 ms of a demo
    UNet step (fused: 1.6 ms, about 2% of the step)."""
    import timm.optim  # Lion lives in timm; imported here to keep module import light

    fused = {"fused": True} if name == "adamw" else {}
    return timm.optim.create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay,
                                          **fused)


def describe_precision(requested: str, resolved: str) -> str:
    """One log line: what runs, on what, and what was asked."""
    return f"precision: {precision_label(resolved)}; asked: {requested}"
