#!/usr/bin/env bash
# The device checks in one go (issue 12 item 5): the CUDA tests (pytest -m gpu) and the GPU benchmarks, under
# 8 minutes on one H200, figures written as JSON to $SKMM_BENCH_OUT (default bench/results). Run from anywhere;
# needs python3 with numpy, torch, scikit-learn, pytest, open_clip (or $PYTHON / the checkout's .venv).
#
#   bash bench/gpu.sh           # on the CUDA machine
#   bash bench/gpu.sh --tiny    # the same commands on the CPU at tiny sizes (the tiny tower): checks the script
#
# Every step runs under its own time limit (the limits add up to ~16 min; the steps' expected total is ~8.5, an
# estimate: the script has not run on a device yet); a failing step is reported and the others still run; the
# exit status is 1 when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
if (( TINY )); then
  DEV=cpu MODEL=skmm-tiny-vit N=130 REPEATS=2 SKETCH_BATCH=64 SECONDS_=0.5 FT_N=32
  export SKMM_BENCH_OUT="${SKMM_BENCH_OUT:-$(mktemp -d)}"
else
  DEV=cuda MODEL=ViT-B-32 N=4096 REPEATS=3 SKETCH_BATCH=1024 SECONDS_=2 FT_N=2048
  export SKMM_BENCH_OUT="${SKMM_BENCH_OUT:-$PWD/bench/results}"
fi
mkdir -p "$SKMM_BENCH_OUT"
failed=()
step() {  # step LIMIT_S NAME COMMAND...: run with a time limit, log to $SKMM_BENCH_OUT/gpu_sh_NAME.log
  local limit=$1 name=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > >(tee "$SKMM_BENCH_OUT/gpu_sh_$name.log") 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  (( rc == 0 )) || failed+=("$name")
}

(( TINY )) || nvidia-smi -L
# Decoded blocks come back to the encoder through shared memory (torch.multiprocessing): /dev/shm must hold the
# jobs in flight (on CUDA up to cores × 512 preprocessed images, ~0.3 GB each job).
df -h /dev/shm | tail -1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# 1. Every CUDA test (bitwise batch invariance of the embed stage on CUDA, sketches, gradients, ...).
step 100 cuda_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests -rA
step 45 sketch_cuda_tests "$PY" -m pytest -q -p no:cacheprovider tests/skmm/test_sketch.py -k cuda -rA  # unmarked
# 2. Embedding throughput on ~56 KB JPEGs: fp32 (with the serial-decode path), then bf16 and tf32 (CUDA only).
EMBED=("$PY" bench/embed_throughput.py --device "$DEV" --model "$MODEL" --n "$N" --repeats "$REPEATS")
step 120 embed_fp32 "${EMBED[@]}" --tag "_${MODEL}_fp32"
step 75 embed_bf16 "${EMBED[@]}" --precision bf16 --no-serial --tag "_${MODEL}_bf16"
(( TINY )) || step 75 embed_tf32 "${EMBED[@]}" --precision tf32 --no-serial --tag "_${MODEL}_tf32"
# 2b. The host's CPU (16 cores): ViT-S-32 on JPEGs, block workers (one process per core) against the bare loop at
#     16 torch threads and the decode workers' arrangement (15 decoders feeding 16 threads).
(( TINY )) || step 120 embed_host_cpu "$PY" bench/embed_throughput.py --device cpu --model ViT-S-32 --n 1024 \
  --repeats 2 --no-serial --tag _host_cpu16
# 3. Sketch throughput (linear-head gradients) on the device.
step 45 sketch "$PY" bench/sketch_throughput.py --device "$DEV" --batch "$SKETCH_BATCH" --seconds "$SECONDS_"
# 3b. FT per-sample gradients of the last block + head, sketched to m = 512, batch sized for the device.
#     Images decoded by the stage's workers (cores − 1 on CUDA), and again serially (--compare-serial): the overlap.
step 120 ft_sketch "$PY" bench/ft_sketch_throughput.py --device "$DEV" --model "$MODEL" --n "$FT_N" --k 1 \
  --sketch-dim 512 --compare-serial
# 4. SkMM selection (convex, 500 FISTA steps), m = 64, n = 10 000: the solver on the device at N = 10^6 and 10^7,
#    the numpy path at 10^6 beside it (numpy at 10^7: bench/README.md §12), one child process per run.
if (( TINY )); then
  step 120 select_device "$PY" bench/select_scale.py --methods skmm --sketch-dim 64 --sizes 3000 --budget 100 \
    --devices numpy,cpu --timeout 100
else
  step 150 select_device "$PY" bench/select_scale.py --methods skmm --sketch-dim 64 --sizes 1000000,10000000 \
    --budget 10000 --devices cuda --timeout 120
  step 90 select_numpy "$PY" bench/select_scale.py --methods skmm --sketch-dim 64 --sizes 1000000 --budget 10000 \
    --devices numpy --timeout 80
fi

echo "results in $SKMM_BENCH_OUT"
if (( ${#failed[@]} )); then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
