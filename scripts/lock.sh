#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (run from anywhere; needs uv, e.g. .venv/bin/uv, and PyPI):
#   requirements/cpu.lock   every dependency + the test and docs extras, with constraints.txt's torch pair
#                           (what scripts/setup.sh and CI install)
#   requirements/cuda.lock  the dependencies for the CUDA image (deploy/Dockerfile): resolved against the base
#                           image's torch pair (requirements/cuda-base.txt), without the torch stack itself,
#                           which the image's base provides
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
COMMON=(--generate-hashes --universal --python-version 3.11)
"$UV" pip compile -q pyproject.toml --extra test --extra docs -c constraints.txt "${COMMON[@]}" -o requirements/cpu.lock
TORCH_STACK=(torch torchvision triton nvidia-cublas-cu12 nvidia-cuda-cupti-cu12 nvidia-cuda-nvrtc-cu12
  nvidia-cuda-runtime-cu12 nvidia-cudnn-cu12 nvidia-cufft-cu12 nvidia-cufile-cu12 nvidia-curand-cu12
  nvidia-cusolver-cu12 nvidia-cusparse-cu12 nvidia-cusparselt-cu12 nvidia-nccl-cu12 nvidia-nvjitlink-cu12
  nvidia-nvtx-cu12)
"$UV" pip compile -q pyproject.toml -c requirements/cuda-base.txt "${COMMON[@]}" \
  $(printf -- '--no-emit-package %s ' "${TORCH_STACK[@]}") -o requirements/cuda.lock
echo "wrote requirements/cpu.lock and requirements/cuda.lock"
