"""Layer families, one module each; importing them fills the registry."""

import importlib
import pkgutil

from .base import REGISTRY, Field, Layer, LayerError, ParamDef

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Field", "Layer", "LayerError", "ParamDef"]
