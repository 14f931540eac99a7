#!/usr/bin/env bash
# The hash of everything the component image is built from (containers/Dockerfile's COPY lines
# and the build's own files): scripts/image.sh labels the image with it, and the container
# test tier rebuilds an image whose label differs.
set -euo pipefail
cd "$(dirname "$0")/.."
find containers/Dockerfile containers/install.sh requirements.lock pyproject.toml README.md \
  flywheel components pipelines -type f ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
