"""Compatibility: generator folders exported before cxrlib's subpackages name
``cxrlib.network.ConditionalUNet`` in their ``model_index.json``. The network lives in
:mod:`cxrlib.diffusion.network`; import it from there.

diffusers finds a component's loading methods by looking up its base classes by name in the
module ``model_index.json`` names, so ``ModelMixin`` must be found here too."""

from diffusers import ModelMixin

from cxrlib.diffusion.network import ConditionalUNet

__all__ = ["ConditionalUNet", "ModelMixin"]
