"""Compatibility: generator folders exported before cxrlib's subpackages hold a
``cxr_pipeline.py`` that imports ``cxrlib.generator.CXRPipeline``, and a ``model_index.json``
naming ``cxrlib.network`` (which diffusers finds only once it is imported). The pipeline lives
in :mod:`cxrlib.diffusion.pipeline`; import it from there."""

import cxrlib.network  # noqa: F401 - model_index.json of such folders names this module
from cxrlib.diffusion.pipeline import CXRPipeline

__all__ = ["CXRPipeline"]
