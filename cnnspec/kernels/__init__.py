"""Kernels, one folder per device (cpu/, cuda/); constants every device shares live here."""

# LeCun's scaled tanh, A * tanh(S * x) (Efficient BackProp, 1998): one definition for the
# CPU and CUDA kernels and the ONNX export. Importing this package imports no Numba.
SCALED_TANH_A = 1.7159
SCALED_TANH_S = 2.0 / 3.0
