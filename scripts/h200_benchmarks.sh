#!/usr/bin/env bash
# The GPU benchmarks the docs report, one step at a time:
#   bash scripts/h200_benchmarks.sh STEP [OUT_DIR]
# A tune step stopped by a time limit resumes when run again with the same OUT_DIR.
# Steps:
#   tune-qwen3     full Qwen3-30B-A3B tune in one command, wall time (docs/tuning.md)
#   tune-qwen2     Qwen2-57B-A14B tune (table for tuned_configs/NVIDIA_H200)
#   compare        moetune compare for both models with the tables in $TABLES (default: the
#                  two tune steps' OUT_DIR/tuned; tuned_configs for the packaged tables)
#   quality        the tuner on $SPACE (default scripts/quality_space.yaml) at the batch sizes
#                  $QUALITY_M (default 16,256,4096), then an exhaustive sweep of that same
#                  space (docs/tuning.md); SPACE=moetune/space.yaml sweeps the default space
#   tune-2gpu      the Qwen3 tune on two GPUs (--devices 0,1), wall time (docs/tuning.md)
#   scale          on a host with two GPUs: the Qwen3 tune on GPU 0 alone, then on both, each
#                  with an empty Triton cache of its own; both wall times (docs/tuning.md)
set -euo pipefail
step=${1:?step: tune-qwen3 | tune-qwen2 | compare | quality | tune-2gpu | scale}
out=${2:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
baseline=scripts/anchor_configs
timed() { /usr/bin/time -f "wall %e s" "$@"; }

case "$step" in
  tune-qwen3)
    timed moetune run --gpu H200 --model Qwen3-30B-A3B --baseline-configs "$baseline" \
        --out-dir "$out/tuned" --no-progress 2>&1 | tee "$out/tune_qwen3.log" ;;
  tune-qwen2)
    timed moetune run --gpu H200 --model Qwen2-57B-A14B --baseline-configs "$baseline" \
        --out-dir "$out/tuned" --no-progress 2>&1 | tee "$out/tune_qwen2.log" ;;
  compare)
    tables=${TABLES:-$out/tuned}
    # A missing folder would silently leave the packaged tables in use.
    [ -d "$tables/NVIDIA_H200" ] || { echo "no tables in $tables/NVIDIA_H200" >&2; exit 2; }
    for model in Qwen3-30B-A3B Qwen2-57B-A14B; do
      MOETUNE_CONFIG_DIR="$tables" moetune compare --gpu H200 --model "$model" \
          --baseline-configs "$baseline" --rounds 3 --out "$out/compare" 2>&1 | tee "$out/compare_$model.log"
    done ;;
  quality)
    space=${SPACE:-scripts/quality_space.yaml}
    sizes=${QUALITY_M:-16,256,4096}
    timed moetune run --gpu H200 --model Qwen3-30B-A3B --space "$space" --batch-sizes "$sizes" \
        --out-dir "$out/quality" --no-progress 2>&1 | tee "$out/quality_tune.log"
    timed python3 scripts/search_quality.py --space "$space" --m "$sizes" --out "$out" \
        --table "$out/quality/NVIDIA_H200/E=128,N=768,K=2048,topk=8,dtype=bf16.json" 2>&1 | tee "$out/quality.log" ;;
  tune-2gpu)
    timed moetune run --gpu H200 --model Qwen3-30B-A3B --baseline-configs "$baseline" --devices 0,1 \
        --out-dir "$out/tuned_2gpu" --no-progress 2>&1 | tee "$out/tune_qwen3_2gpu.log" ;;
  scale)
    root=$(cd "$out" && pwd)  # compile workers may start elsewhere: an absolute cache path
    for devices in 0 0,1; do
      name=${devices/,/_}
      TRITON_CACHE_DIR="$root/triton_cache_$name" timed moetune run --gpu H200 --model Qwen3-30B-A3B \
          --baseline-configs "$baseline" --devices "$devices" --out-dir "$out/scale_$name" --no-progress \
          2>&1 | tee "$out/scale_$name.log"
    done
    grep -H "^wall" "$out"/scale_*.log ;;
  *)
    echo "unknown step: $step" >&2; exit 2 ;;
esac
