#!/usr/bin/env bash
# Create ./.venv and install Nekoya into it. Idempotent: a later run with an
# unchanged pyproject.toml returns at once. Used by gui.sh and test.sh.
#   ./setup.sh          runtime
#   ./setup.sh --test   runtime + test tools (pytest, playwright) + optional optimizers
set -euo pipefail
cd "$(dirname "$0")"
extras="optimizers"
[[ "${1:-}" == "--test" ]] && extras="optimizers,test"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "Nekoya needs Python 3.10 or newer (found: $("$py" --version 2>&1)). Set PYTHON=/path/to/python3.x." >&2
    exit 1
fi
stamp=".venv/.nekoya-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
[[ -f "$stamp" ]] && exit 0
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q -U pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    # NEKOYA_TORCH overrides the torch requirement (e.g. a specific CUDA build).
    # torch==2.13.0: on Linux with an NVIDIA GPU PyPI's wheel is the CUDA build; the project machines
    # serve a local CPU build for the same spec.
    spec="${NEKOYA_TORCH:-torch==2.13.0}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "NVIDIA GPU found: installing the CUDA build of $spec"
    else
        echo "No NVIDIA GPU found: installing $spec (training will run on the CPU)"
    fi
    "${pip[@]}" install -q "$spec"
fi
"${pip[@]}" install -q -e ".[$extras]"
rm -f .venv/.nekoya-*
touch "$stamp"
