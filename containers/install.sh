#!/usr/bin/env bash
# The one install path, shared by `make setup` and the component image (containers/Dockerfile),
# so CI's fresh-venv setup on every run tests the image's install steps too.
#
#   containers/install.sh deps             pip, torch, then every pinned dependency (requirements.lock)
#   containers/install.sh package [ARGS]   flywheel itself, constrained by the lock (default ARGS: .)
#
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0), TORCH_INDEX (a wheel
# index for CUDA builds; unset: the configured index), DS_BUILD_* (set: rebuild DeepSpeed's ops now).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

case "${1:-}" in
  deps)
    pip_install --upgrade pip
    # torch first and alone: left to the resolver, a plain `torch` pulls the newest CUDA build.
    if [ -n "${TORCH_INDEX:-}" ]; then pip_install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; else pip_install "$TORCH_SPEC"; fi
    pip_install -r requirements.lock
    if env | grep -q '^DS_BUILD_'; then
      # Prebuild DeepSpeed's CUDA ops against the torch just installed (needs nvcc, hence the
      # devel base image); without this they JIT-compile at the first training step.
      ds=$(grep -E '^deepspeed==' requirements.lock)
      pip_install --no-build-isolation --no-deps --force-reinstall "$ds"
    fi
    ;;
  package)
    shift
    [ $# -gt 0 ] || set -- .
    pip_install -c requirements.lock "$@"
    "$PY" -c "import flywheel, components, pipelines, kfp, ray, deepspeed, mlflow, optuna, evidently"
    ;;
  *)
    echo "usage: containers/install.sh deps | package [PIP ARGS]" >&2
    exit 2
    ;;
esac
