#!/usr/bin/env bash
# Download the peers' pure-Python wheels into benchmarks/wheels/ (or $DVSFT_WHEELS) on a machine
# with PyPI access, so that gpu_check.sh can install them on a GPU machine that has no network.
# The versions are the ones the CPU image has; override with LIGER=... CCE=...
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${DVSFT_WHEELS:-$HERE/wheels}
mkdir -p "$DEST"
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    "liger-kernel==${LIGER:-0.8.5}" "cut-cross-entropy==${CCE:-25.1.1}"
ls -1 "$DEST"/*.whl
