#!/usr/bin/env bash
# The GPU suite: every GPU figure the project tracks, in one run on one GPU (< 8 minutes on an H200).
#
#   bash benchmarks/gpu_suite.sh [--tutel-src DIR] [--out-dir DIR]   # on a GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run                           # the same steps at toy sizes, on CPU
#
# 1. expert throughput: the reference preset (8 experts, d 768, ffn 3072, 4096 tokens, fwd+bwd),
#    both backends (tutel where importable), --peers where any peer is installed, fp32 and bf16;
# 2. caption decoding of the base MoE: batch 1, 8, 64; cached (static step, CUDA graph) vs re-encode;
# 3. a base-size training step in bf16: dense, attribute MoE, token MoE, with MFU (benchmarks/train_step.py).
# Results: JSONL under benchmarks/results/ (file names carry the GPU: h200, h100, ...) plus
# gpu_suite_<gpu>_<utc time>.log with everything printed. --dry-run writes into a temporary
# directory (or --out-dir) and runs on the CPU: CI runs it (tests/benchmarks/test_gpu_suite.py).
# --tutel-src DIR builds and installs Tutel from a source snapshot first (pip --no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
tutel_src=""
out_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --tutel-src) tutel_src="${2:?--tutel-src needs a directory}"; shift ;;
        --out-dir) out_dir="${2:?--out-dir needs a directory}"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (expected --dry-run, --tutel-src DIR, --out-dir DIR)" >&2; exit 2 ;;
    esac
    shift
done

PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$dry_run" = 1 ]; then
    out_dir="${out_dir:-$(mktemp -d -t gpu_suite_dry.XXXXXX)}"
    device=cpu
    preset=tiny
    model=configs/model/tiny_moe.yaml
    image_args=(--image-size 32)
    batches=(1 2)
    lengths=(2 3)
    repeats=(--warmup 0 --repeats 1)
    static=on  # the GPU's decoding step, run eagerly
    train_size=tiny
    amp=none
    train_repeats=(--warmup 0 --repeats 1)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
else
    if [ -n "$tutel_src" ]; then
        [ -d "$tutel_src" ] || { echo "gpu_suite.sh: --tutel-src '$tutel_src' is not a directory" >&2; exit 2; }
        echo "== building Tutel from $tutel_src"
        "$PY" -m pip install -q --no-build-isolation "$tutel_src"
    fi
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "gpu_suite.sh: no CUDA device (use --dry-run on a CPU)" >&2; exit 2; }
    out_dir="${out_dir:-benchmarks/results}"
    device=cuda
    preset=cpu-reference
    model=configs/model/base_moe.yaml
    image_args=()
    batches=(1 8 64)
    lengths=(5 10 20)
    repeats=(--warmup 1 --repeats 3)
    static=auto
    train_size=base
    amp=bf16
    train_repeats=(--warmup 2 --repeats 5)
fi
mkdir -p "$out_dir"
gpu=$("$PY" - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import torch
from expert_throughput import host_kind
print(host_kind(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
EOF
)
log="$out_dir/gpu_suite_${gpu}_$(date -u +%Y%m%dT%H%M%SZ).log"
echo "gpu_suite: device $device ($gpu), results in $out_dir, log $log" | tee "$log"
start=$SECONDS

backends=(torch)
if "$PY" -c 'import tutel' 2>/dev/null; then backends+=(tutel); fi
peers=()
if [ "$dry_run" = 0 ] && "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if any(u.find_spec(m) for m in ("tutel", "deepspeed", "fairscale")) else 1)'; then
    peers=(--peers)
fi

for dtype in float32 bfloat16; do
    echo "== expert throughput: preset $preset, $dtype, backends ${backends[*]} ${peers[*]}" | tee -a "$log"
    "$PY" benchmarks/expert_throughput.py --preset "$preset" --device "$device" --dtype "$dtype" \
        --backend "${backends[@]}" "${peers[@]}" --out-dir "$out_dir" 2>&1 | tee -a "$log"
done

echo "== caption decoding: $model, batch ${batches[*]}, lengths ${lengths[*]}, cached vs re-encode" | tee -a "$log"
"$PY" benchmarks/caption_decoding.py --model "$model" "${image_args[@]}" --device "$device" --batch "${batches[@]}" \
    --lengths "${lengths[@]}" "${repeats[@]}" --static "$static" --out-dir "$out_dir" 2>&1 | tee -a "$log"

echo "== training step: $train_size, dense / attribute MoE / token MoE, amp $amp" | tee -a "$log"
"$PY" benchmarks/train_step.py --size "$train_size" --device "$device" --amp "$amp" "${train_repeats[@]}" \
    --out "$out_dir/train_step_${train_size}_${gpu}_$(date -u +%Y-%m-%d).jsonl" 2>&1 | tee -a "$log"

echo "gpu_suite: done in $((SECONDS - start)) s; results in $out_dir" | tee -a "$log"
