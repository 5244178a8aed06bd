"""Numba/numpy CPU kernels for cnnspec layers (NCHW, outputs written in place), one
module per layer family; `backend.py` hands them to the layers.

OpenMP workers spin a while after each parallel loop, then sleep. PASSIVE (sleep at
once) made each of a step's parallel loops wake sleeping workers: LeNet-5 b64 step
2.6 ms against 1.4 on an idle machine, when a step had ~40 parallel loops. libgomp's
default spin, 300,000 rounds of ~140 cycles (~15 ms), is the other extreme: beside a
busy process on 2 cores the spinning worker takes the core the lagging one needs, and
a 2-thread LeNet-5 step ran 8x slower than on 1 thread. 1,000 rounds (~50 us) bridge
the gaps between a step's loops and give a busy core back: on the shared 2-core
machine, 2 threads gave 8,633 img/s alone and 6,670 beside a busy process (1 thread:
8,340 alone, 5,373 beside one; the default spin: 1,400 and 1,338; PASSIVE: 9,814 and
5,505), measured with LeNet-5's convs, pools and loss as OpenMP loops. Set before
Numba starts its OpenMP workers; the user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
