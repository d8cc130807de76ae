#!/usr/bin/env bash
# The device checks in one go (issue 12 item 5): the CUDA tests (pytest -m gpu) and the GPU benchmarks, in at most
# $SKMM_GPU_SH_BUDGET_S seconds (default 450: under the issue's 8 minutes, and inside one device call's 10), figures
# written as JSON to $SKMM_BENCH_OUT (default bench/results). Run from anywhere, with python3 (the device image's,
# which has torch) or $PYTHON or the checkout's .venv.
#
#   bash bench/gpu_wheels.sh                           # here, first: .gpu-wheels/ (open_clip, ftfy, wcwidth)
#   SKMM_BENCH_OUT=/tmp/r bash bench/gpu.sh --pack "$OUT"   # there: carry .gpu-wheels; one archive back in $OUT
#   bash bench/gpu.sh --tiny    # the same commands on the CPU at tiny sizes (the tiny tower): checks the script
#   bash bench/gpu.sh --preflight   # only the machine checks that act (/dev/shm, below)
#
# The steps run in order of what issue 12 asks for first: the CUDA tests, ViT-B-32 embedding at fp32 and bf16, the
# FT gradients + sketch, selection at N = 10^6 and 10^7; then the extras (tf32, the host CPU's block workers, the
# linear-head sketch, numpy selection) while the budget lasts. Each step runs under its own limit, cut to the
# budget left; a step with under 15 s left ($SKMM_GPU_SH_MIN_STEP_S) is skipped and reported. A failing step is reported and the others still
# run; the exit status is 1 when any step failed or was skipped. Every step appends a line to gpu_sh_steps.jsonl
# (name, exit status, seconds, limit) and, with --pack DIR, DIR/gpu_results.tar.gz is rewritten after every step
# (the device returns at most 8 files: one archive holds every log and JSON, also when the call is cut short).
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0 PACK="" PREFLIGHT_ONLY=0
while (( $# )); do
  case $1 in
    --tiny) TINY=1 ;;
    --pack) PACK=${2:?--pack needs a folder}; shift ;;
    --preflight) PREFLIGHT_ONLY=1 ;;
    *) echo "usage: bash bench/gpu.sh [--tiny] [--pack DIR] [--preflight]" >&2; exit 2 ;;
  esac
  shift
done
BUDGET=${SKMM_GPU_SH_BUDGET_S:-450}
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "SKMM_GPU_SH_BUDGET_S must be whole seconds; got '$BUDGET'" >&2; exit 2; }
MIN_STEP_S=${SKMM_GPU_SH_MIN_STEP_S:-15}  # a step with less than this left is skipped
[[ $MIN_STEP_S =~ ^[0-9]+$ ]] || { echo "SKMM_GPU_SH_MIN_STEP_S must be whole seconds; got '$MIN_STEP_S'" >&2; exit 2; }
SHM_DEFAULT_MIB=$(( 2 * $(nproc) * 40 > 2048 ? 2 * $(nproc) * 40 : 2048 ))
SHM_NEED_MIB=${SKMM_GPU_SH_SHM_MIB:-$SHM_DEFAULT_MIB}  # decode jobs in flight: up to 2 × cores × ~39 MB at 224 px
[[ $SHM_NEED_MIB =~ ^[0-9]+$ ]] || { echo "SKMM_GPU_SH_SHM_MIB must be whole MiB; got '$SHM_NEED_MIB'" >&2; exit 2; }
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
if (( TINY )); then
  DEV=cpu MODEL=skmm-tiny-vit N=130 BASE_N=130 SMALL_BASE_N=64 REPEATS=2 SKETCH_BATCH=64 SECONDS_=0.5 FT_N=32
  export SKMM_BENCH_OUT="${SKMM_BENCH_OUT:-$(mktemp -d)}"
else
  DEV=cuda MODEL=ViT-B-32 N=16384 BASE_N=2048 SMALL_BASE_N=1024 REPEATS=3 SKETCH_BATCH=1024 SECONDS_=2 FT_N=2048
  export SKMM_BENCH_OUT="${SKMM_BENCH_OUT:-$PWD/bench/results}"
fi
mkdir -p "$SKMM_BENCH_OUT"
STEPS="$SKMM_BENCH_OUT/gpu_sh_steps.jsonl" MACHINE="$SKMM_BENCH_OUT/gpu_sh_machine.log"
: > "$STEPS"
: > "$MACHINE"

# A small /dev/shm (a container's 64 MB, say) kills the decode workers with SIGBUS, which the stages report as
# workers "killed from outside": on the device, grow it (commands run as root there) or else decode in the
# calling thread, and say so. Never on the CPU run (--tiny), which is this machine's own /dev/shm.
# --preflight: this check alone, then exit.
if (( ! TINY )); then
  read -r shm_total_mib shm_free_mib < <(df -Pk /dev/shm | awk 'NR == 2 {print int($2 / 1024), int($4 / 1024)}')
  if (( shm_free_mib < SHM_NEED_MIB )); then
    if (( shm_total_mib < 8192 )) && mount -o remount,size=8G /dev/shm 2>/dev/null; then  # grow, never shrink
      shm="/dev/shm had ${shm_free_mib} MiB free: remounted at 8G"
    else
      export SKMM_DECODE_WORKERS=0
      shm="/dev/shm has ${shm_free_mib} MiB free (< ${SHM_NEED_MIB}) and cannot grow: SKMM_DECODE_WORKERS=0"
    fi
    echo "$shm" | tee -a "$MACHINE"
  fi
fi
(( PREFLIGHT_ONLY )) && exit 0
failed=() skipped=()

pack() {  # the results folder as one archive in $PACK, replaced whole (a cut-short call keeps the last one)
  [[ -n $PACK ]] || return 0
  mkdir -p "$PACK" && tar -czf "$PACK/.gpu_results.tar.gz" -C "$SKMM_BENCH_OUT" . &&
    mv -f "$PACK/.gpu_results.tar.gz" "$PACK/gpu_results.tar.gz"
}

step() {  # step LIMIT_S NAME COMMAND...: run under min(LIMIT_S, budget left), log to $SKMM_BENCH_OUT/gpu_sh_NAME.log
  local limit=$1 name=$2
  shift 2
  local left=$(( BUDGET - SECONDS ))
  if (( left < MIN_STEP_S )); then
    echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left"
    skipped+=("$name")
    printf '{"step": "%s", "skipped": true, "started_s": %d, "budget_left_s": %d}\n' "$name" "$SECONDS" "$left" \
      >> "$STEPS"
    pack
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > >(tee "$SKMM_BENCH_OUT/gpu_sh_$name.log") 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  (( rc == 0 )) || failed+=("$name")
  printf '{"step": "%s", "exit": %d, "started_s": %d, "seconds": %d, "limit_s": %d, "command": "%s"}\n' \
    "$name" "$rc" "$start" "$((SECONDS - start))" "$limit" "$*" >> "$STEPS"
  pack
}

# What the device's Python lacks (open_clip, ftfy): the carried wheels, installed into a temporary folder.
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    SITE=$(mktemp -d)
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .gpu-wheels/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "open_clip is missing: run 'bash bench/gpu_wheels.sh' here and carry .gpu-wheels" >&2
    exit 2
  fi
fi
{
  (( TINY )) || nvidia-smi -L
  # Decoded images come back to the encoder through shared memory (torch.multiprocessing): /dev/shm must hold the
  # jobs in flight (up to 2 × cores jobs of 64 preprocessed images, ~39 MB each at 224 px).
  df -h /dev/shm | tail -1
  nproc
  "$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee -a "$MACHINE"

# 1. Every CUDA test (bitwise batch invariance of the embed stage on CUDA at fp32/tf32/bf16, sketches, gradients,
#    selection, the finetuner); tests/skmm needs neither Prefect nor DuckDB.
step 120 cuda_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/skmm -rA
# 2. Embedding throughput on ~56 KB JPEGs (ViT-B-32, 224 px): fp32, then bf16. The bare loop and the serial path
#    decode on one core, so they time the first BASE_N images only (--baseline-n); the ratios are of images/s.
EMBED=("$PY" bench/embed_throughput.py --device "$DEV" --model "$MODEL" --n "$N" --repeats "$REPEATS")
step 120 embed_fp32 "${EMBED[@]}" --baseline-n "$BASE_N" --tag "_${MODEL}_fp32"
step 75 embed_bf16 "${EMBED[@]}" --precision bf16 --no-serial --baseline-n "$SMALL_BASE_N" --tag "_${MODEL}_bf16"
# 3. FT per-sample gradients of the last block + head, sketched to m = 512, batch sized for the device; images
#    decoded by the stage's workers (cores − 1 on CUDA), and again serially (--compare-serial): the overlap.
step 120 ft_sketch "$PY" bench/ft_sketch_throughput.py --device "$DEV" --model "$MODEL" --n "$FT_N" --k 1 \
  --sketch-dim 512 --compare-serial
# 4. SkMM selection (convex, 500 FISTA steps), m = 64, n = 10 000, on the device at N = 10^6 and 10^7 (one child
#    process per run; the numpy path at 10^6 is an extra below; numpy at 10^7: bench/README.md §12).
if (( TINY )); then
  step 120 select_device "$PY" bench/select_scale.py --methods skmm --sketch-dim 64 --sizes 3000 --budget 100 \
    --devices cpu --timeout 100
else
  step 150 select_device "$PY" bench/select_scale.py --methods skmm --sketch-dim 64 --sizes 1000000,10000000 \
    --budget 10000 --devices cuda --timeout 120
fi
# Extras, while the budget lasts.
# 5. tf32 embedding (CUDA only).
(( TINY )) || step 60 embed_tf32 "${EMBED[@]}" --precision tf32 --no-serial --baseline-n "$SMALL_BASE_N" \
  --tag "_${MODEL}_tf32"
# 6. The host's CPU (16 cores): ViT-S-32 on JPEGs, block workers (one process per core) against the bare loop at
#    16 torch threads and the decode workers' arrangement (15 decoders feeding 16 threads).
if (( TINY )); then
  step 60 embed_host_cpu "$PY" bench/embed_throughput.py --device cpu --model "$MODEL" --n 256 --repeats 1 \
    --no-serial --tag _host_cpu
else
  step 90 embed_host_cpu "$PY" bench/embed_throughput.py --device cpu --model ViT-S-32 --n 1024 --repeats 2 \
    --no-serial --tag _host_cpu16
fi
# 7. Sketch throughput (linear-head gradients) on the device.
step 45 sketch "$PY" bench/sketch_throughput.py --device "$DEV" --batch "$SKETCH_BATCH" --seconds "$SECONDS_"
# 8. The numpy selection path at N = 10^6 on the host, beside the device's.
if (( TINY )); then
  step 60 select_numpy "$PY" bench/select_scale.py --methods skmm --sketch-dim 64 --sizes 3000 --budget 100 \
    --devices numpy --timeout 50
else
  step 100 select_numpy "$PY" bench/select_scale.py --methods skmm --sketch-dim 64 --sizes 1000000 --budget 10000 \
    --devices numpy --timeout 90
fi

echo "results in $SKMM_BENCH_OUT${PACK:+ (packed: $PACK/gpu_results.tar.gz)}; ${SECONDS} s of the ${BUDGET} s budget"
if (( ${#failed[@]} + ${#skipped[@]} )); then
  echo "FAILED steps: ${failed[*]:-none}; SKIPPED (budget): ${skipped[*]:-none}"
  exit 1
fi
echo "all steps passed"
