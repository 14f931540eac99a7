#!/usr/bin/env bash
# The one install path, shared by `make setup` and the component image (containers/Dockerfile),
# so CI's fresh-venv setup on every run tests the image's install steps too.
#
#   containers/install.sh deps             pip, torch, then every pinned runtime dependency (requirements.lock)
#   containers/install.sh dev              the test, lint and benchmark tools (requirements-dev.lock; not in images)
#   containers/install.sh package [ARGS]   flywheel itself, constrained by the locks (default ARGS: .)
#
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0), TORCH_INDEX (a wheel
# index for CUDA builds; unset: the configured index), DS_BUILD_* (set: rebuild DeepSpeed's ops now).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Build arguments arrive as empty strings when unset; an empty PIP_CERT would make pip fail.
for v in PIP_CERT PIP_FIND_LINKS; do [ -n "${!v:-}" ] || unset "$v"; done
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
  dev)
    pip_install -c requirements.lock -r requirements-dev.lock
    ;;
  package)
    shift
    [ $# -gt 0 ] || set -- .
    constraints=(-c requirements.lock)
    [ -f requirements-dev.lock ] && constraints+=(-c requirements-dev.lock)
    pip_install "${constraints[@]}" "$@"
    "$PY" -c "import flywheel, components, pipelines, kfp, ray, deepspeed, mlflow, optuna, evidently"
    ;;
  *)
    echo "usage: containers/install.sh deps | dev | package [PIP ARGS]" >&2
    exit 2
    ;;
esac
