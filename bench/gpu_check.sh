#!/usr/bin/env bash
# The GPU path in one short script (run on a CUDA machine from the repo root, no install needed beyond
# numpy/torch/scikit-learn/pytest): CUDA tests of the sketch and gradients, and sketch throughput on the GPU.
# Results land in $SKMM_BENCH_OUT (default bench/out). Usage: bash bench/gpu_check.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/skmm/test_sketch.py tests/skmm/test_gradients.py -k "cuda or CUDA" -rA 2>&1 | tail -15
python3 bench/sketch_throughput.py --device cuda --batch 1024 --seconds 2
python3 bench/sketch_throughput.py --device cpu --batch 256 --seconds 2
