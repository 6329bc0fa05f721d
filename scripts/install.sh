#!/usr/bin/env bash
# Install the harness on a fresh Debian machine (as root): the GL libraries for headless
# rendering, a virtual environment in .venv, the pinned simulator stack and the model
# extra (torch, timm, safetensors, sentencepiece, transformers, huggingface_hub). Safe to re-run.
#   scripts/install.sh             harness + model core + test tools
#   scripts/install.sh --no-model  harness and scripted expert only (no torch)
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="test,model"
for arg in "$@"; do
  case "$arg" in
    --no-model) EXTRAS="test" ;;
    *) echo "usage: scripts/install.sh [--no-model]" >&2; exit 2 ;;
  esac
done

GL_PACKAGES="libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libosmesa6"
if ! dpkg -s $GL_PACKAGES >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $GL_PACKAGES >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $GL_PACKAGES >/dev/null; }
fi

PYTHON=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import bench, suites, policies, libero.libero, mujoco; print('installed: mujoco', mujoco.__version__)"
if [ "$EXTRAS" = "test,model" ]; then
  .venv/bin/python -c "import torch, timm, safetensors, sentencepiece, transformers; print('installed: torch', torch.__version__, '| timm', timm.__version__)"
fi
