#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one offline run of a few minutes. Needs on the
# machine: an NVIDIA driver (nvidia-smi), Python with numpy, numba, numba-cuda, torch
# (CUDA build) and this repository's other dependencies (pyyaml, jsonschema, typer,
# threadpoolctl, rich, pytest) already installed: nothing is installed here, no package
# index is used. CuPy is not needed.
#
#   benchmarks/gpu_check.sh [OUT]      # default OUT: benchmarks/results/gpu-<UTC time>
#   ONLY="compile staging graph" benchmarks/gpu_check.sh   # only the steps so named
#
# 0. the kernels' on-disk cache: `cnnspec bench --device cuda` of LeNet-5 and ResNet-20,
#    each twice in a fresh NUMBA_CACHE_DIR: the first step's time with every kernel
#    compiled (cold), then loaded (warm); the warm run must compile none
# 1. every conformance case of tests/layer_cases.py (and a few larger shapes) on the GPU
#    against the CPU backend; the real LeNet-5 and tiny ResNet a few SGD steps on both
# 2. the simulator and PTX tests (tests/test_cuda.py), with the conv kernels' registers
# 3. `cnnspec train specs/lenet5.yaml` on the GPU and on the CPU: the same accuracy
# 4. VGG-small's conv kernels in TFLOP/s against the fp32 peak (benchmarks/gpu_convs.py)
# 5. benchmarks/vs_torch.py --device cuda: LeNet-5 b64, ResNet-20 b128, VGG-small b64
#    train steps against PyTorch CUDA in strict fp32 and with its defaults
# 6. input batches staged a step early (a second stream) against given at their step:
#    LeNet-5 b64 and ResNet-20 b128 train steps, and the same weights (gpu_staging.py)
# 7. whether numba-cuda captures cnnspec kernels into a CUDA graph here, and the launch
#    time it would save (gpu_graph_probe.py; training steps are not captured yet)
# Everything lands in OUT (logs, JSON, Markdown); the exit status is 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$out"
failed=()
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure
    local name="$1" word
    shift
    if [[ -n "${ONLY:-}" ]]; then  # run only the steps whose names start with a word of ONLY
        for word in $ONLY; do [[ "$name" == "$word"* ]] && break; word=""; done
        [[ -n "$word" ]] || return 0
    fi
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$out/$name.log"; then
        failed+=("$name")
    fi
}

nvidia-smi | tee "$out/nvidia-smi.txt" || { echo "no NVIDIA driver: nvidia-smi failed"; exit 2; }
python - <<'EOF' | tee "$out/versions.txt" || exit 2
import importlib
for name in ("numpy", "numba", "numba_cuda", "torch", "cnnspec"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        raise SystemExit(f"missing {name} ({e}): install it first; this script installs nothing")
import torch
from cnnspec.kernels.cuda.backend import BACKEND
print("torch.cuda", torch.cuda.is_available(), torch.version.cuda)
reason = BACKEND.unusable()
if reason:
    raise SystemExit(reason)
EOF

for spec in specs/lenet5.yaml specs/resnet20-cifar.yaml; do
    name=$(basename "$spec" .yaml)
    for run in cold warm; do
        step "compile-$name-$run" env NUMBA_CACHE_DIR="$out/kernel-cache-$name" \
            python -m cnnspec bench "$spec" --device cuda --repeat 1 --warmup 0 --json
    done
done
if compgen -G "$out/compile-*-warm.log" >/dev/null; then
    python - "$out" <<'EOF' | tee "$out/compile-cache.txt" || failed+=(compile-cache)
import json, sys
from pathlib import Path
out, bad = Path(sys.argv[1]), []
for name in sorted(p.name[len("compile-") : -len("-warm.log")] for p in out.glob("compile-*-warm.log")):
    cold, warm = (
        json.loads((t := (out / f"compile-{name}-{run}.log").read_text())[t.index("{") :])["cold_start"]
        for run in ("cold", "warm")
    )
    print(
        f"{name}: first train step {cold['first_step_s']:.1f} s with {cold['kernels_compiled']} "
        f"kernels compiled, {warm['first_step_s']:.1f} s with {warm['kernels_loaded']} loaded "
        f"from the cache and {warm['kernels_compiled']} compiled"
    )
    if warm["kernels_compiled"] or not warm["kernels_loaded"]:
        bad.append(name)
if bad:
    raise SystemExit(f"the warm runs did not load every kernel from the cache: {bad}")
EOF
fi

step conformance python tests/cuda_sim.py "$out/conformance" --gpu
step lenet5-steps python tests/cuda_sim.py "$out/lenet5" --gpu --spec specs/lenet5.yaml --batch 64 --steps 5
step resnet-steps python tests/cuda_sim.py "$out/tiny-resnet" --gpu --spec examples/tiny-resnet.yaml --batch 64 --steps 5
step simulator-and-ptx python -m pytest tests/test_cuda.py -q -s -p no:cacheprovider

for device in cuda cpu; do
    step "train-lenet5-$device" python -m cnnspec train specs/lenet5.yaml --device "$device" \
        --out "$out/train-lenet5-$device" --no-progress
done
if [[ -f "$out/train-lenet5-cuda/metrics.jsonl" && -f "$out/train-lenet5-cpu/metrics.jsonl" ]]; then
    python - "$out" <<'EOF' | tee "$out/train-lenet5-compare.txt" || failed+=(train-compare)
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
acc = {}
for device in ("cuda", "cpu"):
    lines = (out / f"train-lenet5-{device}" / "metrics.jsonl").read_text().splitlines()
    acc[device] = json.loads(lines[-1])["val_acc"]
print(f"LeNet-5 on digits, final validation accuracy: GPU {acc['cuda']:.2%}, CPU {acc['cpu']:.2%}")
if abs(acc["cuda"] - acc["cpu"]) > 0.01:
    raise SystemExit("the GPU's accuracy differs from the CPU's by more than 1 point")
EOF
fi

step convs python benchmarks/gpu_convs.py benchmarks/vgg-small.yaml --batch 64 --out "$out/vgg-small-convs"
for run in specs/lenet5.yaml:64 specs/resnet20-cifar.yaml:128 benchmarks/vgg-small.yaml:64; do
    spec=${run%:*}
    step "bench-$(basename "$spec" .yaml)" python -m cnnspec bench "$spec" --device cuda \
        --batch "${run#*:}" --json
done
step vs-torch python benchmarks/vs_torch.py --device cuda --wait-quiet 5 --out "$out/vs_torch"
step staging python benchmarks/gpu_staging.py --out "$out/staging.json"
step graph-probe python benchmarks/gpu_graph_probe.py --out "$out/graph-probe.json"

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (logs in $out)"
    exit 1
fi
echo "all checks passed; results in $out"
