#!/usr/bin/env python
"""The conv layers of a spec on the GPU, one at a time: forward, input-gradient and
weight-gradient kernels timed with CUDA events, as TFLOP/s and as a share of the GPU's
fp32 peak (issue 9's target: VGG-small's large convs at >= 25% of an H200's 67 TFLOP/s).

    python benchmarks/gpu_convs.py [SPEC] [--batch 64] [--peak-tflops 67] [--out STEM]
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=str(HERE / "vgg-small.yaml"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=67.0, help="fp32 peak (H200: 67)")
    p.add_argument("--out", type=Path, help="write STEM.json and STEM.md")
    args = p.parse_args(argv)

    from numba import cuda

    import cnnspec
    from cnnspec.kernels.cuda import conv

    net = cnnspec.load(args.spec)
    rng = np.random.default_rng(0)
    rows = []
    for info in net.infos:
        layer = info.layer
        if info.node.type != "conv2d" or layer.is_dense:
            continue
        a, n = layer.attrs, args.batch
        (w_shape,) = [d.shape for d in layer.param_defs() if d.name == "weight"]
        x_shape, y_shape = (n, *layer.in_shapes[0]), (n, *layer.out_shape)
        x = cuda.to_device(rng.standard_normal(x_shape, dtype=np.float32))
        w = cuda.to_device(rng.standard_normal(w_shape, dtype=np.float32))
        y = cuda.device_array(y_shape, np.float32)
        dy = cuda.to_device(rng.standard_normal(y_shape, dtype=np.float32))
        dx = cuda.device_array(x_shape, np.float32)
        dw = cuda.device_array(w_shape, np.float32)
        geo = (a["stride"], a["padding"], a["dilation"], a["groups"])
        size = conv.conv2d_workspace(x_shape, w_shape, y_shape, *geo[:3])
        ws = cuda.device_array(max(size, 1), np.float32)
        runs = {
            "forward": partial(conv.conv2d_forward, x, w, None, *geo, y, ws),
            "dx+dw": partial(conv.conv2d_backward, x, w, dy, *geo, ws, dx, dw, None),
        }
        flops = 2.0 * math.prod(y_shape) * math.prod(w_shape[1:])
        row = {"layer": info.name, "x": list(x_shape), "w": list(w_shape)}
        for name, fn in runs.items():
            fn()  # compile
            cuda.synchronize()
            start, end = cuda.event(), cuda.event()
            start.record()
            for _ in range(args.repeat):
                fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / args.repeat
            work = flops * (1 if name == "forward" else 2)
            tflops = work / (ms * 1e-3) / 1e12
            row[name] = {"ms": ms, "tflops": tflops, "peak_share": tflops / args.peak_tflops}
        rows.append(row)
        f, b = row["forward"], row["dx+dw"]
        print(
            f"{info.name:>12} {str(x_shape):>20} -> {str(y_shape):>20}: forward {f['ms']:.3f} ms "
            f"{f['tflops']:.1f} TFLOP/s ({f['peak_share']:.0%}); dx+dw {b['ms']:.3f} ms "
            f"{b['tflops']:.1f} TFLOP/s ({b['peak_share']:.0%})",
            flush=True,
        )
    if args.out:
        result = {"spec": args.spec, "batch": args.batch, "peak_tflops": args.peak_tflops}
        name = getattr(cuda.get_current_device(), "name", b"simulator")
        result["device"] = name.decode(errors="replace") if isinstance(name, bytes) else name
        result["rows"] = rows
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [
            f"# conv kernels of {Path(args.spec).name}, batch {args.batch}, {result['device']}",
            "",
            "| layer | input | weight | forward ms | TFLOP/s | of peak | dx+dw ms | TFLOP/s "
            "| of peak |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            f, b = r["forward"], r["dx+dw"]
            lines.append(
                f"| {r['layer']} | {r['x']} | {r['w']} | {f['ms']:.3f} | {f['tflops']:.1f} | "
                f"{f['peak_share']:.0%} | {b['ms']:.3f} | {b['tflops']:.1f} | "
                f"{b['peak_share']:.0%} |"
            )
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
