"""numba-cuda kernels for cnnspec layers, with the contracts of `kernels/cpu/` (NCHW,
float32, outputs written in place into device arrays), one module per layer family;
`backend.py` hands them to the layers.

Every kernel is written with shared memory and `syncthreads` only (no warp
shuffles), so Numba's CUDA simulator runs them all, and every reduction runs in a
fixed order (no floating-point atomics): a run gives the same bits on the same GPU.
Device functions are inlined (`inline="always"`): a separately compiled one would be
built for "the current device", so compiling to PTX without a GPU would need a driver.
"""
