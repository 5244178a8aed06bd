"""Numba/numpy CPU kernels for cnnspec layers (NCHW, outputs written in place)."""

# OpenMP's default wait policy (workers spin a little after each parallel loop, then
# sleep) is the right one now that every conv runs inside Numba: with PASSIVE (set
# here while convs ran split BLAS GEMMs from Python threads) each of a step's ~40
# parallel loops woke sleeping workers: LeNet-5 b64 step 2.6 ms against 1.4, ResNet-20
# b128 146 ms against 139 (VGG-small, whose big dense layer still splits a BLAS GEMM
# across Python threads: 107 against 110).

from .activation import (
    elu_backward,
    elu_forward,
    leaky_relu_backward,
    leaky_relu_forward,
    maxout_backward,
    maxout_forward,
    prelu_backward,
    prelu_forward,
    relu_backward,
    relu_forward,
    rrelu_backward,
    rrelu_forward,
    scaled_tanh_backward,
    scaled_tanh_forward,
    sigmoid_backward,
    sigmoid_forward,
    tanh_backward,
    tanh_forward,
)
from .conv import (
    col2im,
    conv2d_backward,
    conv2d_forward,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    im2col,
)
from .dense import dense_backward, dense_forward
from .loss import mse, rbf_backward, rbf_forward, softmax_cross_entropy
from .norm import (
    batchnorm_backward,
    batchnorm_forward_eval,
    batchnorm_forward_train,
    lrn_backward,
    lrn_forward,
)
from .pool import (
    avgpool2d_backward,
    avgpool2d_forward,
    global_avgpool_backward,
    global_avgpool_forward,
    maxpool2d_backward,
    maxpool2d_forward,
    subsample2d_backward,
    subsample2d_forward,
)

__all__ = [
    "avgpool2d_backward",
    "avgpool2d_forward",
    "batchnorm_backward",
    "batchnorm_forward_eval",
    "batchnorm_forward_train",
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "conv_transpose2d_backward",
    "conv_transpose2d_forward",
    "dense_backward",
    "dense_forward",
    "elu_backward",
    "elu_forward",
    "global_avgpool_backward",
    "global_avgpool_forward",
    "im2col",
    "leaky_relu_backward",
    "leaky_relu_forward",
    "lrn_backward",
    "lrn_forward",
    "maxout_backward",
    "maxout_forward",
    "maxpool2d_backward",
    "maxpool2d_forward",
    "mse",
    "prelu_backward",
    "prelu_forward",
    "rbf_backward",
    "rbf_forward",
    "relu_backward",
    "relu_forward",
    "rrelu_backward",
    "rrelu_forward",
    "scaled_tanh_backward",
    "scaled_tanh_forward",
    "sigmoid_backward",
    "sigmoid_forward",
    "softmax_cross_entropy",
    "subsample2d_backward",
    "subsample2d_forward",
    "tanh_backward",
    "tanh_forward",
]
