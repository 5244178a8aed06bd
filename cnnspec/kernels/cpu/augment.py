"""The training batches' augmentation (train/data.py's Batches): a random crop after zero
padding, and a horizontal flip, per image, in place in the batch.

A Python loop over the images (a window view and a copy each) took 127 us of a b64
batch of 1x32x32 images with padding 2 (1 thread, Intel Xeon model 207), about 5% of
LeNet-5's ~2.5 ms step in `cnnspec train`; one kernel call 30 us (a Batches epoch 140 ->
90 us a batch; 3x32x32 with padding 4 and flips 319 -> 192). Pure copies, so the same
bits as the loop, which stands in for it while a first run compiles it in the background.
"""

from __future__ import annotations

from numba import prange

from ._common import SplitBySize

__all__ = ["crop_flip"]


@SplitBySize
def _crop_flip(x, padded, uniform, n, p, hflip):
    _, c_, h, w = x.shape
    span = 2 * p + 1
    for i in prange(n):
        for c in range(c_):  # the staging buffer's interior (its border stays zero)
            for r in range(h):
                for v in range(w):
                    padded[i, c, p + r, p + v] = x[i, c, r, v]
        dy, dx = int(uniform[i, 0] * span), int(uniform[i, 1] * span)
        # two loops, not one with a column step of -1 or 1: that kept the plain copy from
        # vectorising (a b64 batch 53 -> 62 us at 1x32x32, 161 -> 187-193 at 3x32x32)
        if hflip and uniform[i, 2] < 0.5:
            for c in range(c_):
                for r in range(h):
                    for v in range(w):
                        x[i, c, r, v] = padded[i, c, dy + r, dx + w - 1 - v]
        else:
            for c in range(c_):
                for r in range(h):
                    for v in range(w):
                        x[i, c, r, v] = padded[i, c, dy + r, dx + v]


def _crop_flip_numpy(x, padded, uniform, n, p, hflip):
    _, _, h, w = x.shape
    padded[:n, :, p : p + h, p : p + w] = x[:n]
    span = 2 * p + 1
    for i in range(n):
        u = uniform[i]
        dy, dx = int(u[0] * span), int(u[1] * span)
        window = padded[i, :, dy : dy + h, dx : dx + w]
        # Flip while copying out of the staging buffer: no overlap, no temporary.
        x[i] = window[:, :, ::-1] if hflip and u[2] < 0.5 else window


def crop_flip(x, padded, uniform, n: int, p: int, hflip: bool) -> None:
    """Images i < n of x (B, C, H, W), in place: padded by p zeros, cropped back at
    (dy, dx) = (int(u0 * (2p + 1)), int(u1 * (2p + 1))), and mirrored if `hflip` and u2 <
    0.5, where (u0, u1, u2) = uniform[i] (floats in [0, 1)). `padded` (B, C, H + 2p,
    W + 2p) is a staging buffer whose border is zero and stays so."""
    _crop_flip.or_stand_in(_crop_flip_numpy, x, padded, uniform, int(n), int(p), bool(hflip))
