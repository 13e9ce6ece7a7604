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
#   sweep          the full default space swept at M = 4096, 256 and 16 against the winners of
#                  $TABLE (default: the packaged Qwen3-30B-A3B table, from a full default tune):
#                  four processes (one per role at 4096 and 16; every role at 256) spread over
#                  the GPUs in $GPUS (default 0,1,2,3), several per GPU running one after another
#   tune-2gpu      the Qwen3 tune on two GPUs (--devices 0,1), wall time (docs/tuning.md)
#   scale          on a host with two GPUs: the Qwen3 tune on GPU 0 alone, then on both, each
#                  with an empty Triton cache of its own; both wall times, and each run's
#                  timeline from its journal (scripts/run_timeline.py; docs/tuning.md).
#                  SCALE_RUNS=n (default 1) takes n such pairs on the one host, in
#                  OUT_DIR/pair_1..n: hosts differ more than code changes often do
set -euo pipefail
step=${1:?step: tune-qwen3 | tune-qwen2 | compare | quality | sweep | tune-2gpu | scale}
out=${2:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
baseline=sglang-vllm-h200  # packaged with moetune (moetune/baselines/)
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
  sweep)
    table=${TABLE:-tuned_configs/NVIDIA_H200/E=128,N=768,K=2048,topk=8,dtype=bf16.json}
    jobs=("gemm1 4096,16" "gemm2_unfused 4096,16" "gemm2_fused 4096,16" "gemm1,gemm2_unfused,gemm2_fused 256")
    IFS=, read -ra gpus <<< "${GPUS:-0,1,2,3}"
    n=${#gpus[@]}
    workers=$(( ($(nproc) - n) / n )); (( workers > 15 )) && workers=15; (( workers < 1 )) && workers=1
    for slot in "${!gpus[@]}"; do
      for i in "${!jobs[@]}"; do
        (( i % n == slot )) || continue
        read -r roles sizes <<< "${jobs[$i]}"
        CUDA_VISIBLE_DEVICES=${gpus[$slot]} timed python3 scripts/search_quality.py --table "$table" \
            --space moetune/space.yaml --roles "$roles" --m "$sizes" --compile-workers "$workers" \
            --out "$out/sweep_$i" > "$out/sweep_$i.log" 2>&1 || echo "sweep job $i failed" >&2
      done &
    done
    wait
    grep -h "^M=" "$out"/sweep_*.log | sort -s -t= -k2,2n
    grep -H "^wall" "$out"/sweep_*.log ;;
  tune-2gpu)
    timed moetune run --gpu H200 --model Qwen3-30B-A3B --baseline-configs "$baseline" --devices 0,1 \
        --out-dir "$out/tuned_2gpu" --no-progress 2>&1 | tee "$out/tune_qwen3_2gpu.log" ;;
  scale)
    # Read the libraries once, so that neither run pays for a cold disk cache the other does not.
    python3 -c "import moetune.tune, optuna"
    runs=${SCALE_RUNS:-1}
    pair_dir() { if [ "$runs" = 1 ]; then echo "$out"; else echo "$out/pair_$1"; fi; }
    for pair in $(seq 1 "$runs"); do
      dir=$(pair_dir "$pair")
      mkdir -p "$dir"
      root=$(cd "$dir" && pwd)  # compile workers may start elsewhere: an absolute cache path
      for devices in 0 0,1; do
        name=${devices/,/_}
        started=$(date +%s.%N)
        TRITON_CACHE_DIR="$root/triton_cache_$name" timed moetune run --gpu H200 --model Qwen3-30B-A3B \
            --baseline-configs "$baseline" --devices "$devices" --out-dir "$dir/scale_$name" --no-progress \
            2>&1 | tee "$dir/scale_$name.log"
        ended=$(date +%s.%N)
        python3 scripts/run_timeline.py "$dir/scale_$name/NVIDIA_H200/moetune-studies.journal" \
            --started "$started" --ended "$ended" > "$dir/timeline_$name.log" 2>&1 || true
      done
      cat "$dir"/timeline_*.log
    done
    for pair in $(seq 1 "$runs"); do
      dir=$(pair_dir "$pair")
      one=$(grep "^wall" "$dir/scale_0.log" | awk '{print $2}')
      two=$(grep "^wall" "$dir/scale_0_1.log" | awk '{print $2}')
      echo "pair $pair: 1 GPU $one s, 2 GPUs $two s, ratio $(python3 -c "print(f'{$one / $two:.3f}')")"
    done ;;
  *)
    echo "unknown step: $step" >&2; exit 2 ;;
esac
