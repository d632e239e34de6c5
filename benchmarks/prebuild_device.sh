#!/usr/bin/env bash
# Build the extension here, ahead of a lent GPU machine, for that machine's image, so that
# benchmarks/gpu_check.sh can skip its build step (about a minute of the lease):
#
#   bash benchmarks/prebuild_device.sh [DIR]     # default DIR: .device-build (git-ignored)
#
# The lent H200's image runs Python 3.12 with torch 2.11.0+cu130 (the device tool's KINDS.md),
# not this repository's pins, so this makes a Python 3.12 venv with that torch (a download of
# about 3 GB the first time), builds the extension in a copy of the tracked tree for sm_90, and
# leaves in DIR:
#   _C.cpython-312-x86_64-linux-gnu.so   the extension, stripped of debug info
#   built_for                            the torch version, Python and sources it was built from
# Then carry DIR to the lent machine and name it:
#   HANDLSTM_PREBUILT=.device-build bash benchmarks/gpu_check.sh
# gpu_check.sh uses the prebuilt extension only if that machine's torch, Python and sources
# match and the extension imports with its CUDA kernels; otherwise it builds as usual.
#
# Environment: PYTHON312 (a Python 3.12 interpreter), DEVICE_TORCH (default 2.11.0),
# DEVICE_VENV (default /tmp/handlstm-device-venv, kept between runs).

set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-.device-build}
TORCH_VERSION=${DEVICE_TORCH:-2.11.0}
VENV=${DEVICE_VENV:-/tmp/handlstm-device-venv}

py312=${PYTHON312:-}
if [[ -z $py312 ]]; then
    for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            py312=$c
            break
        fi
    done
fi
[[ -n $py312 ]] || { echo "no Python 3.12 found: set PYTHON312" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    rm -rf "$VENV"
    "$py312" -m venv "$VENV"
    # No requirements file: its torch pin is this repository's, not the lent machine's.
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" ninja pybind11 setuptools wheel numpy
fi

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$tree"
(cd "$tree" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace)

rm -f "$OUTDIR"/_C*.so
so=$(ls "$tree"/handlstm_cuda/_C*.so)
strip --strip-debug -o "$OUTDIR/$(basename "$so")" "$so"
# What gpu_check.sh compares: the torch version, Python and a hash of the sources (so that an
# extension built from other sources is never used).
(cd "$tree" && PYTHON="$VENV/bin/python" bash benchmarks/gpu_check.sh --build-id) \
    >"$OUTDIR/built_for"
# The stripped copy must import with its CUDA kernels here already (no GPU needed for that).
cp "$OUTDIR"/_C*.so "$tree/handlstm_cuda/"
(cd "$tree" && "$VENV/bin/python" -c "import handlstm_cuda as h, sys; sys.exit(not h.has_cuda_kernels())")
echo "prebuilt for $(cat "$OUTDIR/built_for"): $(ls -s "$OUTDIR"/_C*.so)"
