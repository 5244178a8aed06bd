"""Layer families; importing them fills the registry."""

from . import activation, conv, dense, dropout, merge, norm, output, pool  # noqa: F401
from .base import REGISTRY, Field, Layer, LayerError, ParamDef

__all__ = ["REGISTRY", "Field", "Layer", "LayerError", "ParamDef"]
