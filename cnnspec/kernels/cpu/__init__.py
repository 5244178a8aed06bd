"""Numba/numpy CPU kernels for cnnspec layers (NCHW, outputs written in place)."""

import os

# Numba's OpenMP workers otherwise spin after every parallel loop and take the cores
# that conv's split GEMMs need next (measured on 2 cores: +30% VGG-style, +11% ResNet-20
# training throughput). Read when the OpenMP runtime starts; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .activation import (  # noqa: E402
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
