"""Argument checks every device's kernels make the same way (plain Python and numpy:
importing this imports no Numba)."""

from __future__ import annotations


def check_shape(name: str, a, shape) -> None:
    # a tuple of the same ints needs no conversion: the kernels check ~40 shapes a step
    if a.shape != shape and tuple(a.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def check_grouped_conv(x, w, out, groups) -> None:
    """x (N, C, H, W), w (O, C/groups, kh, kw), out (N, O, oh, ow)."""
    n, c = x.shape[:2]
    o, cg = w.shape[:2]
    g = int(groups)
    if c != cg * g or o % g:
        raise ValueError(f"bad grouped conv shapes: x {x.shape}, w {w.shape}, groups {g}")
    check_shape("out", out, (n, o, out.shape[2], out.shape[3]))


def check_class_labels(labels, n: int, k: int | None) -> None:
    """Labels of a softmax loss: N integers in [0, K), N > 0 (k None: the range is the
    kernel's to check, as it reads them)."""
    check_shape("labels", labels, (n,))
    if labels.dtype.kind not in "iu":
        raise ValueError("labels must be integers")
    if n == 0:
        raise ValueError("empty batch")
    if k is not None and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels out of range [0, {k})")
