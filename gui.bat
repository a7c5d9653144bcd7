@echo off
rem Start the Nekoya GUI on Windows; the first run creates .venv and installs everything.
rem Arguments pass through to launch.py (kohya_ss flags: --listen, --server_port, --inbrowser, ...);
rem for a login, NEKOYA_PASSWORD or --password-file keeps the password out of the process list.
setlocal
cd /d "%~dp0"
if not exist ".venv\Scripts\python.exe" (
    python -m venv .venv || (echo Nekoya needs Python 3.10 or newer on PATH. & exit /b 1)
)
set "PY=.venv\Scripts\python.exe"
if not exist ".venv\.nekoya-installed" (
    "%PY%" -m pip install -q -U pip
    "%PY%" -c "import torch" 2>nul || (
        where nvidia-smi >nul 2>nul && (
            echo NVIDIA GPU found: installing the CUDA build of torch
            "%PY%" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
        ) || (
            echo No NVIDIA GPU found: installing the CPU build of torch
            "%PY%" -m pip install -q torch==2.13.0
        )
    )
    "%PY%" -m pip install -q -e ".[optimizers]" || exit /b 1
    type nul > ".venv\.nekoya-installed"
)
set GRADIO_ANALYTICS_ENABLED=False
set HF_HUB_OFFLINE=1
"%PY%" launch.py %*
