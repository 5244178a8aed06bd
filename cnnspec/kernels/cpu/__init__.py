"""Numba/numpy CPU kernels for cnnspec layers (NCHW, outputs written in place), one
module per layer family; `backend.py` hands them to the layers.

OpenMP's default wait policy (workers spin a little after each parallel loop, then
sleep) is the right one now that every conv runs inside Numba: with PASSIVE (set
here while convs ran split BLAS GEMMs from Python threads) each of a step's ~40
parallel loops woke sleeping workers: LeNet-5 b64 step 2.6 ms against 1.4, ResNet-20
b128 146 ms against 139 (VGG-small, whose big dense layer still splits a BLAS GEMM
across Python threads: 107 against 110).
"""
