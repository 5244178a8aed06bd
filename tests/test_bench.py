"""Benchmark tools: cnnspec.bench, `cnnspec bench`, and benchmarks/vs_torch.py's torch twins.

Nothing here is timed: the tests check the shape of the results, not the speed.
"""

import io
import json
from collections import Counter
from pathlib import Path

import numba
import pytest
from rich.console import Console

import cnnspec
from cnnspec.bench import (
    LAYER_KEYS,
    PHASE_KEYS,
    PHASES,
    RESULT_KEYS,
    bench,
    busy_warning,
    cache_verdict,
    render_bench,
)

REPO = Path(__file__).resolve().parent.parent

# conv-bn-relu feeding both a conv and a residual add: covers parameters, batch norm,
# fan-in gradient sums, pooling, dense (with a ReLU the model may fuse) and the softmax loss
TINY = """
name: tiny
input: [2, 8, 8]
layers:
  - {name: a, type: conv2d, filters: 4, kernel: 3, padding: 1}
  - {name: bn, type: batchnorm2d}
  - {name: r, type: relu}
  - {name: b, type: conv2d, filters: 4, kernel: 3, padding: 1, bias: false}
  - {name: sum, type: add, inputs: [r, b]}
  - {name: pool, type: maxpool2d, kernel: 2}
  - {name: hidden, type: dense, units: 5}
  - {name: hidden_relu, type: relu}
  - {name: fc, type: dense, units: 3}
  - {name: out, type: softmax}
"""


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_result():
    net = cnnspec.loads(TINY)
    return net, bench(net, batch=2, threads=1, warmup=0, repeat=1, peak_n=64, peak_repeat=1)


def test_bench_returns_documented_keys_with_positive_numbers(tiny_result):
    net, r = tiny_result
    assert set(RESULT_KEYS) <= set(r)
    assert r["name"] == "tiny" and r["batch"] == 2 and r["repeat"] == 1
    assert r["macs_per_image"] == net.totals()["macs"] > 0
    for key, _, factor in PHASES:
        phase = r[key]
        assert set(PHASE_KEYS) <= set(phase), key
        for k in ("median_ms", "min_ms", "images_per_s", "gflops", "peak_share"):
            assert phase[k] > 0, (key, k)
        assert phase["flops_per_batch"] == factor * 2 * r["macs_per_image"] * 2
    assert r["peak"]["gflops"] > 0 and r["peak"]["n"] == 64
    cold = r["cold_start"]
    assert cold["compile_s"] > 0 and cold["first_step_s"] > 0
    assert cold["total_s"] == pytest.approx(cold["compile_s"] + cold["first_step_s"])
    assert cold["numba_cache"] in {"warm", "cold", "partial", "in-process", "stand-ins", "unknown"}
    assert r["threads"]["numba"] == 1
    assert isinstance(r["final_loss"], float)
    assert r["machine"]["cores"] >= 1 and r["versions"]["numba"] == numba.__version__
    strict_json(json.dumps(r))  # JSON-ready: no numpy scalars, no NaN


def test_layer_table_covers_every_layer(tiny_result):
    net, r = tiny_result
    assert [row["name"] for row in r["layers"]] == [i.name for i in net.infos]
    fused = getattr(net.compile(batch_size=1), "fused", {})  # layers the model skips
    # norms folded into the conv before them in eval mode: no eval time of their own
    folded = set(getattr(net.compile(batch_size=1, training=False), "folded", {}).values())
    assert folded == {"bn"}
    for row in r["layers"]:
        assert set(LAYER_KEYS) <= set(row)
        assert row["ran"] == (row["name"] not in fused), row["name"]
        assert row["total_ms"] == pytest.approx(row["forward_ms"] + row["backward_ms"])
        if row["ran"]:
            assert row["forward_ms"] > 0, row["name"]
            assert (row["eval_ms"] == 0) == (row["name"] in folded), row["name"]
            # every layer here has parameters or is downstream of some: all have a backward
            assert row["backward_ms"] > 0, row["name"]
        else:
            assert row["total_ms"] == row["eval_ms"] == 0
    assert sum(row["share"] for row in r["layers"]) == pytest.approx(1.0)
    assert r["layers_total_ms"] == pytest.approx(sum(x["total_ms"] for x in r["layers"]))
    assert 0 < r["layers_coverage"] <= 1
    types = r["by_type"]
    assert set(types) == {i.node.type for i in net.infos}
    assert sum(t["count"] for t in types.values()) == len(net.infos)
    assert sum(t["share"] for t in types.values()) == pytest.approx(1.0)
    conv = next(row for row in r["layers"] if row["name"] == "a")
    assert conv["macs"] == 4 * 8 * 8 * 2 * 9 and conv["forward_gflops"] > 0
    # the first conv's input needs no gradient: its backward is the weight gradient alone,
    # as many FLOPs as its forward; the second conv's adds the input gradient
    second = next(row for row in r["layers"] if row["name"] == "b")
    batch = r["batch"]
    assert conv["backward_gflops"] == pytest.approx(
        2 * conv["macs"] * batch / (conv["backward_ms"] * 1e6)
    )
    assert second["backward_gflops"] == pytest.approx(
        4 * second["macs"] * batch / (second["backward_ms"] * 1e6)
    )
    assert types["conv2d"]["forward_gflops"] > 0 and types["conv2d"]["backward_gflops"] > 0
    assert types["maxpool2d"]["forward_gflops"] == 0


def test_layer_table_names_the_convs_that_ran_winograd(monkeypatch):
    from cnnspec.kernels.cpu import winograd

    spec = (
        "input: [2, 8, 8]\nlayers:\n"
        "  - {name: c, type: conv2d, filters: 4, kernel: 3, padding: 1}\n  - {type: relu}\n"
        "  - {name: fc, type: dense, units: 3}\n  - {type: softmax}\n"
    )
    seen = {}
    for mode in ("1", "0"):
        monkeypatch.setattr(winograd, "MODE", mode)  # Winograd wherever it applies / nowhere
        r = bench(cnnspec.loads(spec), batch=2, threads=1, warmup=0, repeat=1, peak_n=0)
        seen[mode] = {row["name"]: row["winograd"] for row in r["layers"]}
        console = Console(file=io.StringIO(), width=200, record=True)
        render_bench(r, console)
        assert ("conv2d (Winograd)" in console.export_text()) == (mode == "1")
    assert seen["1"]["c"] == ["train forward", "backward", "eval"] and seen["1"]["fc"] == []
    assert seen["0"]["c"] == []


def test_bench_restores_thread_count():
    before = numba.get_num_threads()
    net = cnnspec.loads(TINY)
    r = bench(net, batch=1, threads=1, warmup=0, repeat=1, peak_n=0, layers=False)
    assert numba.get_num_threads() == before
    assert r["peak"] is None and r["step"]["peak_share"] is None
    assert r["layers"] == [] and r["layers_coverage"] is None


def test_render_bench_prints_every_layer(tiny_result):
    net, r = tiny_result
    console = Console(file=io.StringIO(), width=160, record=True)
    render_bench(r, console)
    text = console.export_text()
    for phase in ("eval forward", "train fwd+bwd", "SGD step"):
        assert phase in text
    for info in net.infos:
        assert info.name in text
    assert "GEMM peak" in text and "cold start" in text


def test_cache_verdict():
    base = {"signatures": 5, "hits": 2, "misses": 1, "cache_path": "/c"}

    def after(sigs, hits, misses):
        return {"signatures": 5 + sigs, "hits": 2 + hits, "misses": 1 + misses, "cache_path": "/c"}

    assert cache_verdict(base, after(0, 0, 0))["numba_cache"] == "in-process"
    none = {"signatures": 0, "hits": 0, "misses": 0, "cache_path": "/c"}
    assert cache_verdict(none, none)["numba_cache"] == "stand-ins"  # a first run's
    assert cache_verdict(base, after(3, 3, 0))["numba_cache"] == "warm"
    assert cache_verdict(base, after(3, 0, 3))["numba_cache"] == "cold"
    got = cache_verdict(base, after(3, 1, 2))
    assert got["numba_cache"] == "partial" and got["kernels_compiled"] == 2


def test_busy_warning():
    assert busy_warning({"cores": 2, "external_load_cores": 0.0, "loadavg_before": [0.1]}) is None
    assert "unreliable" in busy_warning(
        {"cores": 2, "external_load_cores": 1.5, "loadavg_before": [0.1]}
    )


# ---- `cnnspec bench` ---------------------------------------------------------------------------
def test_cli_bench_json(cli):
    result = cli(
        "bench",
        "specs/lenet5.yaml",
        "--batch",
        "2",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--json",
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    data = strict_json(result.stdout)
    assert set(RESULT_KEYS) <= set(data)
    assert data["name"] == "lenet5" and data["batch"] == 2
    assert data["threads"]["numba"] == 1
    assert len(data["layers"]) == 12
    assert data["step"]["images_per_s"] > 0


def test_cli_bench_table(cli):
    result = cli(
        "bench",
        "specs/lenet5.yaml",
        "--batch",
        "2",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "SGD step" in result.stdout and "c3" in result.stdout


def test_cli_bench_invalid_spec_exits_1(cli):
    result = cli("bench", "tests/broken/missing_required.yaml")
    assert result.exit_code == 1
    assert "error" in result.stderr and "Traceback" not in result.stdout + result.stderr


# ---- benchmarks/vs_torch.py --------------------------------------------------------------------
TORCH_TYPES = {
    "Conv2d": "conv2d",
    "Linear": "dense",
    "BatchNorm2d": "batchnorm2d",
    "MaxPool2d": "maxpool2d",
    "AvgPool2d": "avgpool2d",
}


@pytest.mark.parametrize("name", ["lenet5", "resnet20-cifar", "vgg-small"])
def test_torch_twins_match_the_specs(vs_torch, name):
    torch = pytest.importorskip("torch")
    net = cnnspec.load(REPO / vs_torch.SPECS[name])
    model = vs_torch.torch_model(name)
    assert vs_torch.param_count(model) == net.totals()["trainable_params"]
    # the same layers with weights or pooling windows (ResNet's option-A subsampling is a
    # slice in torch, a 1x1 max pool in the spec)
    spec_types = Counter(
        i.node.type
        for i in net.infos
        if i.node.type in TORCH_TYPES.values()
        and not (i.node.type == "maxpool2d" and i.layer.attrs["kernel"] == [1, 1])
    )
    torch_types = Counter(
        TORCH_TYPES[type(m).__name__] for m in model.modules() if type(m).__name__ in TORCH_TYPES
    )
    assert torch_types == spec_types
    x = torch.zeros(2, *net.input_shape)
    assert tuple(model(x).shape) == (2, *net.output_shape)


def test_vs_torch_rows_use_known_specs(vs_torch):
    assert {r.spec for r in vs_torch.ROWS} <= set(vs_torch.SPECS)
    for path in vs_torch.SPECS.values():
        assert (REPO / path).exists()
    assert {(r.key, r.batch, r.mode) for r in vs_torch.ROWS} >= {
        ("lenet5-b64", 64, "train"),
        ("lenet5-b256", 256, "train"),
        ("resnet20-b128", 128, "train"),
        ("vgg-small-b64", 64, "train"),
        ("lenet5-b256-eval", 256, "eval"),
        ("resnet20-b128-eval", 128, "eval"),
    }


def test_vs_torch_markdown_renders(vs_torch):
    side = {
        "images_per_s": 100.0,
        "median_ms": 10.0,
        "peak_rss_mb": 200.0,
        "rss_after_import_mb": 100.0,
    }
    startup = {
        "total_s": 1.0,
        "import_s": 0.3,
        "build_s": 0.1,
        "first_s": 0.5,
        "cache": {"numba_cache": "warm", "kernels_compiled": 0},
    }
    result = {
        "date": "2025-01-01 00:00 UTC",
        "machine": {"cpu": "CPU", "cores": 2, "platform": "linux", "loadavg": [0.1, 0, 0]},
        "versions": {
            "torch": "t",
            "numba": "n",
            "numpy": "np",
            "python": "3",
            "cnnspec": "c",
            "git": "abc",
        },
        "settings": {
            "mode": "quick",
            "threads": 2,
            "rounds": 3,
            "round_s": 0.3,
            "warmup": 2,
            "max_load": 0.2,
        },
        "quiet_check_cores": 0.05,
        "rows": [
            {
                "row": {"label": "LeNet-5", "batch": 64, "mode": "train"},
                "cnnspec": side,
                "torch": side,
                "ratio": 1.0,
                "external_load_cores": 0.0,
                "rounds_kept": 3,
                "rounds_discarded": 1,
            },
            {
                "row": {"label": "ResNet-20", "batch": 128, "mode": "eval"},
                "cnnspec": side,
                "torch": side,
                "ratio": 0.5,
                "external_load_cores": 0.9,
                "rounds_kept": 3,
                "rounds_discarded": 0,
                "note": "no quiet round: all rounds were measured under load",
            },
        ],
        "startup": [
            {
                "spec": "lenet5",
                "batch": 64,
                "cnnspec_warm": startup,
                "cnnspec_cold": startup,
                "torch": startup,
            }
        ],
    }
    text = vs_torch.markdown(result)
    assert "| LeNet-5 | 64 | train step |" in text and "**1.00**" in text
    assert "| ResNet-20 | 128 | inference |" in text and "0.90 ⚠ | 3 / 0 |" in text
    assert "unreliable" in text and "1 of 2 rows" in text and "CPU, 2 cores" in text
    assert "instruction sets: cnnspec ?, torch ?" in text  # older results name none


def test_vs_torch_work_against_the_peak(vs_torch):
    def row(mode, busy=0, macs=1_000_000):
        return {
            "row": {"label": "Net", "batch": 100, "mode": mode, "busy": busy},
            "macs_per_image": macs,
            "cnnspec": {"median_ms": 10.0},
            "torch": {"median_ms": 20.0},
        }

    peak = {"gflops": 100.0, "kernel_gflops": 100.0, "blas_gflops": 80.0, "n": 2048}
    rows = [row("train"), row("eval"), row("train", busy=1), row("train", macs=None)]
    result = {"peak": peak, "rows": rows, "settings": {"threads": 2}}
    vs_torch.add_work(result)
    train, infer, busy, unknown = (r.get("work") for r in rows)
    # a step: 3 x 2 x 1e6 x 100 = 0.6 GFLOP; at the peak 6 ms, against torch's 20
    assert train["gflop_per_batch"] == pytest.approx(0.6)
    assert train["cnnspec_gflops"] == pytest.approx(60.0)
    assert train["torch_gflops"] == pytest.approx(30.0)
    assert train["ceiling"] == pytest.approx(20.0 / 6.0)
    assert infer["gflop_per_batch"] == pytest.approx(0.2)
    assert infer["ceiling"] == pytest.approx(10.0)
    assert "ceiling" not in busy and unknown is None  # beside busy processes: no ceiling
    text = "\n".join(vs_torch._work_lines(rows, result))
    assert "fp32 peak, 100 GFLOP/s on 2 threads" in text
    assert "| Net | 100 | train step | 0.60 | 60 (60%) | 30 (30%) | 3.33 |" in text
    assert "| Net | 100 | inference | 0.20 | 20 (20%) | 10 (10%) | 10.00 |" in text
    assert "with 1 competing busy process | 0.60 | 60 (60%) | 30 (30%) | - |" in text
    assert vs_torch._work_lines(rows, {"rows": rows, "peak": None}) == []


def test_vs_torch_holds_torch_to_avx2_beside_the_256_bit_kernels(vs_torch, monkeypatch):
    from cnnspec.kernels.cpu import _common

    monkeypatch.setattr(_common, "cpu_has_avx512", lambda: True)
    monkeypatch.delenv("CNNSPEC_VECTOR_BITS", raising=False)
    assert vs_torch.torch_isa_env("auto") == {} == vs_torch.blas_isa_env("auto")
    assert vs_torch.torch_isa_env("avx2")["ATEN_CPU_CAPABILITY"] == "avx2"
    monkeypatch.setenv("CNNSPEC_VECTOR_BITS", "256")
    held = vs_torch.torch_isa_env("auto")
    assert held["ONEDNN_MAX_CPU_ISA"] == "AVX2" and held["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    # cnnspec's dense layers run numpy's OpenBLAS: held to AVX2 alike
    blas = vs_torch.blas_isa_env("auto")
    assert blas == {"OPENBLAS_CORETYPE": "Haswell"}
    assert vs_torch.torch_isa_env("native") == {} == vs_torch.blas_isa_env("native")
    monkeypatch.setattr(_common, "cpu_has_avx512", lambda: False)  # an AVX2 CPU: no hold
    assert vs_torch.torch_isa_env("auto") == {} == vs_torch.blas_isa_env("auto")
    rows = [{"cnnspec": {"isa": "256-bit kernels"}, "torch": {"isa": "AVX2"}}]
    text = vs_torch._isa_text(rows, {"torch_isa_env": held, "blas_isa_env": blas})
    assert text.startswith("cnnspec 256-bit kernels, torch AVX2 (held there")
    assert text.endswith("OpenBLAS (cnnspec's dense layers, the peak's matmul) too: "
                         "OPENBLAS_CORETYPE=Haswell")  # fmt: skip


def test_kernel_state_counts_both_builds_of_each_kernel():
    """A kernel in two builds (serial, parallel) holds its dispatchers in an object of its
    own: the cache verdict counted neither (start-up rows read "0 kernels compiled")."""
    from cnnspec.bench.measure import _dispatchers
    from cnnspec.kernels.cpu import conv

    found = {id(d) for d in _dispatchers()}
    assert {id(conv._forward_tiles.serial), id(conv._forward_tiles.parallel)} <= found


def test_memory_bandwidth_measures_each_pass_on_each_thread_count(memory_bandwidth, capsys):
    """benchmarks/memory_bandwidth.py: read, copy and streaming copy (each copy checked)
    on the thread counts asked for, in whole aligned lines a thread; threads restored."""
    import numba

    was = numba.get_num_threads()
    counts = sorted({1, numba.config.NUMBA_NUM_THREADS})
    rows = memory_bandwidth.main(["--mib", "1", "--repeat", "1", "--threads", *map(str, counts)])
    assert numba.get_num_threads() == was
    assert [r["threads"] for r in rows] == counts
    assert all(r[k] > 0 for r in rows for k in ("read", "copy", "streaming"))
    assert "streaming" in capsys.readouterr().out
    bounds = memory_bandwidth._slices(1000 * 16 + 5, 3)
    assert bounds[0] == 0 and bounds[-1] == 1000 * 16 and all(b % 16 == 0 for b in bounds)
    assert memory_bandwidth.aligned(5).ctypes.data % 64 == 0
