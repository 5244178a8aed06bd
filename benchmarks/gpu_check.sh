#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one offline run of a few minutes. Needs on the
# machine: an NVIDIA driver (nvidia-smi), Python with numpy, numba, numba-cuda, torch
# (CUDA build) and this repository's other dependencies (pyyaml, jsonschema, typer,
# threadpoolctl, rich, pytest) already installed: nothing is installed here, no package
# index is used. CuPy is not needed.
#
#   benchmarks/gpu_check.sh [OUT]      # default OUT: benchmarks/results/gpu-<UTC time>
#
# 1. every conformance case of tests/layer_cases.py (and a few larger shapes) on the GPU
#    against the CPU backend; the real LeNet-5 and tiny ResNet a few SGD steps on both
# 2. the simulator and PTX tests (tests/test_cuda.py), with the conv kernels' registers
# 3. `cnnspec train specs/lenet5.yaml` on the GPU and on the CPU: the same accuracy
# 4. VGG-small's conv kernels in TFLOP/s against the fp32 peak (benchmarks/gpu_convs.py)
# 5. benchmarks/vs_torch.py --device cuda: LeNet-5 b64, ResNet-20 b128, VGG-small b64
#    train steps against PyTorch CUDA in strict fp32 and with its defaults
# Everything lands in OUT (logs, JSON, Markdown); the exit status is 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$out"
failed=()
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure
    local name="$1"
    shift
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

step conformance python tests/cuda_sim.py "$out/conformance" --gpu
step lenet5-steps python tests/cuda_sim.py "$out/lenet5" --gpu --spec specs/lenet5.yaml --batch 64 --steps 5
step resnet-steps python tests/cuda_sim.py "$out/tiny-resnet" --gpu --spec examples/tiny-resnet.yaml --batch 64 --steps 5
step simulator-and-ptx python -m pytest tests/test_cuda.py -q -s -p no:cacheprovider

for device in cuda cpu; do
    step "train-lenet5-$device" python -m cnnspec train specs/lenet5.yaml --device "$device" \
        --out "$out/train-lenet5-$device" --no-progress
done
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

step convs python benchmarks/gpu_convs.py benchmarks/vgg-small.yaml --batch 64 --out "$out/vgg-small-convs"
for run in specs/lenet5.yaml:64 specs/resnet20-cifar.yaml:128 benchmarks/vgg-small.yaml:64; do
    spec=${run%:*}
    step "bench-$(basename "$spec" .yaml)" python -m cnnspec bench "$spec" --device cuda \
        --batch "${run#*:}" --json
done
step vs-torch python benchmarks/vs_torch.py --device cuda --wait-quiet 5 --out "$out/vs_torch"

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (logs in $out)"
    exit 1
fi
echo "all checks passed; results in $out"
