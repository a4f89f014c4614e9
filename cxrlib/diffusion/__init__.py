"""The conditional DDPM (notebook 02): the ``condition`` vector, the ``network``, its
``checkpoints``, the ``samplers`` (DDPM, DDIM, DPM-Solver++ with classifier-free guidance),
``training``, the diffusers ``pipeline`` (:class:`cxrlib.diffusion.pipeline.CXRPipeline`),
``export`` of a run's generator, and ``figures``.
"""
