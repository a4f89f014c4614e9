"""cxrlib: the library behind the notebooks of the synthetic chest X-ray study.

Stages, in the one direction data flows: ``data`` (manifests, readers, image cache, the
embedded ``phantom`` cohort) -> ``diffusion`` -> ``sampling`` -> ``classify`` -> ``stats``.
"""

__version__ = "0.1.0"
