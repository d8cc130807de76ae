#!/usr/bin/env bash
# The Python packages bench/gpu.sh needs that the device machine's image lacks, as wheels in .gpu-wheels/ (ignored
# by git): run here, before a device call, then name .gpu-wheels in the call's `carry`. The image has torch,
# torchvision, numpy, scikit-learn, scipy, pillow, pyarrow, fsspec, safetensors, huggingface_hub, timm, regex,
# tqdm and pytest (/work/.library/device/KINDS.md); skmm also needs open_clip and its ftfy (+ wcwidth): pure-Python
# wheels, at the versions constraints.txt pins. gpu.sh installs them into a temporary folder there, only when
# `import open_clip` fails.
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
pins=()
for name in open_clip_torch ftfy wcwidth; do
  pin=$(grep -i -E "^${name}==" constraints.txt) || { echo "constraints.txt pins no ${name}" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf .gpu-wheels.part && mkdir .gpu-wheels.part
"$PY" -m pip download --quiet --no-deps --only-binary :all: --dest .gpu-wheels.part "${pins[@]}"
rm -rf .gpu-wheels && mv .gpu-wheels.part .gpu-wheels
ls -l .gpu-wheels
