#!/usr/bin/env bash
# Start the Nekoya GUI; the first run creates ./.venv and installs everything.
# Arguments pass through to launch.py (kohya_ss flags: --listen, --server_port, --inbrowser, ...);
# for a login, NEKOYA_PASSWORD or --password-file keeps the password out of the process list.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec .venv/bin/python launch.py "$@"
