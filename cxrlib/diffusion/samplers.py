"""Samplers: classifier-free guidance, the diffusers schedulers, batched seeded generation.

Samplers come from diffusers and are configured from the training schedule (cosine, zero
terminal SNR, v-prediction, "trailing" timestep spacing): ``ddpm`` (ancestral, stochastic),
``ddim`` (deterministic, eta 0, the paper's sampler), ``ddim_eta`` (DDIM with eta 0.5: fresh
noise at every step, half of DDPM's posterior standard deviation, on DDIM's grid), ``dpmpp``
(DPM-Solver++ multistep, second order, an ODE solver) and ``sde_dpmpp`` (its SDE variant,
SDE-DPM-Solver++, second order). The stochastic ones re-inject noise at every step, which
deterministic few-step solvers are known to lose high-frequency detail without (EDM, Karras et
al. 2022, keeps stochastic sampling for its harder data sets). Guidance is
:func:`guided_output`, continuous in the weight w (:data:`cxrlib.core.schema.Guidance`: w = 0 the
plain conditional model, the authors' scale s is w = s - 1), rescaled with phi.

Every image has its own seed: the initial noise and, for DDPM, the noise of every step come
from a generator seeded with it, so an image is the same whatever batch it is generated in
(up to float rounding: the UNet's batched convolutions differ by about 1e-6 between batch
sizes, which moves the odd pixel by one grey level). Cohort seeds are derived from (run seed,
source image id, replica) by :func:`image_seed`, so any synthetic image can be regenerated
from its manifest row. The preview grids of
training (:mod:`cxrlib.diffusion.training`), the explorer, the synthetic cohorts, the audit's sweep,
the diffusers pipeline (:mod:`cxrlib.diffusion.pipeline`) and the benchmarks all sample through this
module.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

from cxrlib.core.progress import tqdm
from cxrlib.core.schema import SAMPLERS
from cxrlib.diffusion.network import ConditionalUNet

#: DDIM's eta for each DDIM sampler name (eta 0: deterministic). Not eta 1 (DDPM's variance,
#: which ``ddpm`` samples): with zero terminal SNR the first step's sqrt(1 - alpha_prev -
#: sigma^2) is sqrt(0) there, and rounding makes it NaN (every image came out black).
DDIM_ETA: dict[str, float] = {"ddim": 0.0, "ddim_eta": 0.5}


def guided_output(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                  cond: torch.Tensor, guidance: float, rescale_phi: float) -> torch.Tensor:
    """Classifier-free guidance with rescaling (Lin et al. 2024, eq. 15-16), continuous in
    the weight w = ``guidance`` (:data:`cxrlib.core.schema.Guidance`).

    out = null + (1 + w) * (cond - null): w = 0 is the plain conditional model (the authors'
    generation setting, one model call), w = -1 the unconditional one; the authors' scale s
    is w = s - 1. Then out's per-image standard deviation is pulled toward that of the
    conditional output: out = phi * out * std(cond) / std(out) + (1 - phi) * out.
    """
    if guidance == 0:
        return model(x, t, cond)
    n = x.shape[0]
    drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]),
                 drop.to(x.device))
    cond_out, null_out = both[:n], both[n:]
    out = null_out + (1 + guidance) * (cond_out - null_out)
    if rescale_phi > 0:
        dims = tuple(range(1, out.ndim))
        ratio = cond_out.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
        out = rescale_phi * out * ratio + (1 - rescale_phi) * out
    return out


#: Autocast dtype of each resolved precision (:func:`cxrlib.hardware.resolve_precision`).
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def sample_images(model: ConditionalUNet, scheduler: SchedulerMixin, cond: np.ndarray,
                  seeds: list[int], guidance: float, rescale_phi: float, steps: int,
                  progress: bool = False, precision: str = "no") -> np.ndarray:
    """Images (n x R x R uint8) for conditions and per-image seeds with a diffusers scheduler
    configured like the training schedule, as one batch.

    Args:
        model: the conditional UNet; sampling runs on its device, R is its ``sample_size``.
        scheduler: a sampler from :func:`make_sampler` (its ``set_timesteps`` is called here;
            a DDIM one's ``cxrlib_eta`` is passed to every step).
        cond: condition vectors, one per seed (n x ``cond_dim``,
            :func:`cxrlib.diffusion.condition.encode_conditions`).
        seeds: one seed per image: its initial noise and step noise (for stochastic samplers)
            come from its own generator, so an image does not depend on the batch.
        guidance: the guidance weight w (:func:`guided_output`; 0: one plain conditional call).
        rescale_phi: guidance rescale phi (:func:`guided_output`).
        steps: sampler steps.
        progress: show a tqdm bar over the steps.
        precision: a resolved ``mixed_precision`` (``no``, ``bf16``, ``fp16``): the UNet's
            autocast; guidance and the scheduler step run in fp32.
    """
    device = next(model.parameters()).device
    res = model.unet.config.sample_size
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(1, res, res, generator=g) for g in gens]).to(device)
    c = torch.as_tensor(cond, dtype=torch.float32, device=device)
    scheduler.set_timesteps(steps)
    # DDIM takes its eta per step (diffusers' DDIMScheduler.step); the others have none
    extra = {"eta": scheduler.cxrlib_eta} if hasattr(scheduler, "cxrlib_eta") else {}
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision),
                              enabled=precision in AUTOCAST_DTYPES)

    def unet(*args: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(*args).float()

    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress):
        tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        out = guided_output(unet, scheduler.scale_model_input(x, t), tt, c, guidance,
                            rescale_phi)
        x = scheduler.step(out, t, x, generator=gens, **extra).prev_sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


def ddim_for(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM (eta 0, the paper's sampler) on the training schedule, trailing spacing."""
    return DDIMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing")


def make_sampler(name: str, train_scheduler: DDPMScheduler):
    """A diffusers sampler configured like the training schedule (a DDIM one carries its
    eta as ``cxrlib_eta``, which :func:`sample_images` passes to every step)."""
    config = train_scheduler.config
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name in DDIM_ETA:
        scheduler = ddim_for(train_scheduler)
        scheduler.cxrlib_eta = DDIM_ETA[name]
        return scheduler
    if name in ("dpmpp", "sde_dpmpp"):
        algorithm = "dpmsolver++" if name == "dpmpp" else "sde-dpmsolver++"
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type=algorithm, solver_order=2, timestep_spacing="trailing",
            final_sigmas_type="zero")
    raise ValueError(f"unknown sampler '{name}'; use one of {SAMPLERS}")


def image_seed(run_seed: int, key: str, replica: int) -> int:
    """A stable 31-bit seed for (run seed, a source id, a replica number)."""
    ss = np.random.SeedSequence([run_seed, zlib.crc32(key.encode()), replica])
    return int(ss.generate_state(1)[0] % (2**31 - 1))


def generate(model: ConditionalUNet, train_scheduler: DDPMScheduler, cond: np.ndarray,
             seeds: list[int] | np.ndarray, sampler: str = "ddim", steps: int = 50,
             guidance: float = 0.0, guidance_rescale: float = 0.7,
             batch_size: int = 64, progress: bool = False, precision: str = "no") -> np.ndarray:
    """Images (n x R x R uint8) for condition vectors and per-image seeds, in batches
    (:func:`sample_images`).

    Args:
        model: the conditional UNet (R is its ``sample_size``).
        train_scheduler: the training schedule the sampler is configured from.
        cond: condition vectors, one row per seed.
        seeds: one seed per image (e.g. :func:`image_seed`); the image depends on its seed,
            not on its batch.
        sampler: one of :data:`cxrlib.core.schema.SAMPLERS` (:func:`make_sampler`).
        steps: sampler steps.
        guidance: the guidance weight w (:func:`guided_output`; 0: the plain conditional model).
        guidance_rescale: guidance rescale phi (:func:`guided_output`).
        batch_size: images per call of :func:`sample_images` (a fresh sampler each).
        progress: show a tqdm bar over the batches.
        precision: the UNet's autocast (``no``, ``bf16``, ``fp16``).
    """
    res = model.unet.config.sample_size
    out = np.empty((len(seeds), res, res), dtype=np.uint8)
    batches = range(0, len(seeds), batch_size)
    for start in tqdm(batches, desc=f"{sampler} x{steps}", disable=not progress):
        stop = min(start + batch_size, len(seeds))
        out[start:stop] = sample_images(model, make_sampler(sampler, train_scheduler),
                                        cond[start:stop], list(seeds[start:stop]),
                                        guidance, guidance_rescale, steps,
                                        precision=precision)
    return out


def timed_generate(*args, **kwargs) -> tuple[np.ndarray, float]:
    """:func:`generate` and its wall-clock seconds per image."""
    start = time.perf_counter()
    images = generate(*args, **kwargs)
    return images, (time.perf_counter() - start) / max(len(images), 1)
