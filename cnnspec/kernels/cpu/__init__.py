"""Numba/numpy CPU kernels for cnnspec layers (NCHW, outputs written in place), one
module per layer family; `backend.py` hands them to the layers.

OpenMP workers spin a while after each parallel loop (libgomp's default: ~300,000
rounds), so the next of a step's many loops starts at once. Beside a busy process a
spinning worker takes the core its lagging partner needs (2 threads ran LeNet-5 8x
slower than one); threads.py's governor then runs the kernels on one thread, which has
no partner to wait for. Capping the spin instead (GOMP_SPINCOUNT=1000, ~50 us, as
cnnspec did before the governor) cost a quiet machine's 2-thread ResNet-20 b128 step
~20% (AMD EPYC Zen 5: 458-686 against 621-716 img/s over three quick runs each). The
user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is respected as always.
"""
