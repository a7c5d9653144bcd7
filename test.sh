#!/usr/bin/env bash
# Run the test suite (CPU, offline, tiny random models). Browser tests need Debian's chromium
# (/usr/bin/chromium); .ci/run installs it. Arguments pass through to pytest.
#   ./test.sh --fast   the fast lane: everything but the tests marked slow or browser (pyproject.toml)
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --test
.venv/bin/python -c 'import torch; print("torch", torch.__version__)'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
lane=()
if [[ "${1:-}" == "--fast" ]]; then
    shift
    lane=(-m "not slow and not browser")
fi
exec .venv/bin/python -m pytest -q "${lane[@]}" "$@"
