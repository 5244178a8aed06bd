"""Benchmark a compiled network: throughput, per-layer times, achieved GFLOP/s, cold start.

``bench(net)`` compiles ``net`` for one batch size and measures, on random data:

* the median images/s of an eval forward (``model.forward(x, train=False)`` on a model
  compiled with ``training=False``, as inference runs), of a train
  forward + loss + backward (``model.loss_and_grads``) and of a full SGD step with momentum
  (``model.step``);
* a per-layer table in the manner of ``caffe time``: the median forward (train mode; an
  output layer's loss is counted in its forward) and backward milliseconds of every layer,
  each layer's share of their sum, and its eval-mode forward. The layers are timed while
  the model runs its own ``loss_and_grads`` / ``forward`` (their methods are wrapped for the
  measurement), so the table follows the model's execution plan: a layer the model fuses
  into another (a ReLU run in a convolution's epilogue) shows as not run. Layers with
  products (conv, dense) show forward and backward GFLOP/s (the backward counts the weight
  gradient's MACs, and the input gradient's where the layer computes one), summed by type
  with their share of the peak;
* achieved GFLOP/s: 2 * MACs * batch per forward, three times that for a train pass or step,
  and its share of the machine's fp32 GEMM peak, measured in the same run as the better of
  cnnspec's micro-kernel on every thread and a numpy float32 ``n x n`` matmul on the same
  thread count (best of a few each);
* cold start: the time to compile the model and run its first step, and whether Numba's
  on-disk cache was warm (kernels loaded), cold (kernels compiled) or not involved at all
  (kernels already in this process: then the number is not a cold start).

Every number is wall-clock time on a machine that may be shared: ``result["machine"]``
records the load average before the run and the CPU that *other* processes used during it
(``external_load_cores``); a busy machine makes every number here unreliable.

The result is a JSON-serialisable dict (keys listed in ``RESULT_KEYS``, ``PHASE_KEYS``,
``LAYER_KEYS``); ``render_bench(result, console)`` prints it with rich.
"""

from .measure import (
    LAYER_KEYS,
    PHASE_KEYS,
    PHASES,
    RESULT_KEYS,
    bench,
    cache_verdict,
    kernel_state,
    random_batch,
)
from .probes import blas_threads, cpu_model, machine_info, set_blas_threads, threads_set
from .render import busy_warning, render_bench

__all__ = [
    "LAYER_KEYS",
    "PHASES",
    "PHASE_KEYS",
    "RESULT_KEYS",
    "bench",
    "blas_threads",
    "busy_warning",
    "cache_verdict",
    "cpu_model",
    "kernel_state",
    "machine_info",
    "random_batch",
    "render_bench",
    "set_blas_threads",
    "threads_set",
]
