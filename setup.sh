#!/usr/bin/env bash
# Create ./.venv and install Nekoya into it. Idempotent: a later run with an
# unchanged pyproject.toml returns at once. Used by gui.sh and test.sh.
#   ./setup.sh          runtime
#   ./setup.sh --test   runtime + test tools (pytest, playwright) + optional optimizers; the test extra
#                       also holds the logging extra's wandb, so the W&B tests run
# Weights & Biases logging (log_with = wandb) is the optional `logging` extra, left out of the runtime
# install (wandb brings its own service binaries and pins of its own): add it with
#   .venv/bin/python -m pip install -e '.[optimizers,logging]'
# The test install holds the runtime one, so gui.sh after test.sh installs nothing, and
# test.sh after gui.sh adds only the test tools.
set -euo pipefail
cd "$(dirname "$0")"
want_test=""
[[ "${1:-}" == "--test" ]] && want_test=1
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "Nekoya needs Python 3.10 or newer (found: $("$py" --version 2>&1)). Set PYTHON=/path/to/python3.x." >&2
    exit 1
fi
hash="$(sha1sum pyproject.toml | cut -c1-12)"
runtime_stamp=".venv/.nekoya-optimizers-$hash"
test_stamp=".venv/.nekoya-optimizers,test-$hash"
[[ -f "$test_stamp" ]] && exit 0
[[ -z "$want_test" && -f "$runtime_stamp" ]] && exit 0
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
test_reqs=()
if [[ -n "$want_test" && -f "$runtime_stamp" ]]; then
    # Nekoya is installed for this pyproject.toml: read the test extra's requirements from the
    # installed package's metadata (none read: fall back to the full install below).
    mapfile -t test_reqs < <(.venv/bin/python -c '
import importlib.metadata as m
for r in m.requires("nekoya") or ():
    spec, _, marker = r.partition(";")
    if "extra" in marker and "\"test\"" in marker:
        print(spec.strip())' 2>/dev/null || true)
fi
if (( ${#test_reqs[@]} )); then
    # add the test tools without reinstalling the package itself
    "${pip[@]}" install -q "${test_reqs[@]}"
else
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
    extras="optimizers"
    [[ -n "$want_test" ]] && extras="optimizers,test"
    "${pip[@]}" install -q -e ".[$extras]"
fi
rm -f .venv/.nekoya-*
if [[ -n "$want_test" ]]; then touch "$test_stamp"; else touch "$runtime_stamp"; fi
