"""Dropout's one kernel: apply the mask the layer drew."""

from __future__ import annotations

import numpy as np

__all__ = ["dropout_apply"]


def dropout_apply(x, mask, out):
    """out = x * mask (elementwise; forward and backward alike)."""
    np.multiply(x, mask, out=out)
