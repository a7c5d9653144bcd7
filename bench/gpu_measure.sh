#!/usr/bin/env bash
# The GPU figures of issue #6 in one go, for a session that is lent a GPU machine (see bench/gpu_session.md).
#   bench/gpu_measure.sh paths   # tiny model: fp16 (GradScaler), bf16, fused AdamW, AdamW8bit, xformers fallback
#   bench/gpu_measure.sh sd15    # SD 1.5 512 px: GC + AdamW8bit + cached latents (VRAM target), then plain AdamW (it/s)
#   bench/gpu_measure.sh sdxl    # SDXL 1024 px: GC + AdamW8bit + U-Net only (VRAM target); builds a ~14 GB model first
# Each run prints one JSON line (bench/train_speed.py). Runs on a CPU too (slowly), which is how it is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
run() { echo "## train_speed.py $*"; "$PY" bench/train_speed.py "$@"; }

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
case "${1:-paths}" in
  paths)
    run --size tiny --mixed-precision fp16
    run --size tiny --mixed-precision bf16
    run --size tiny --mixed-precision bf16 --optimizer AdamW8bit --gradient-checkpointing
    run --size tiny --mixed-precision bf16 --again --cache-to-disk
    ;;
  sd15)
    run --size sd15 --steps ${STEPS:-30} --gradient-checkpointing --optimizer AdamW8bit
    run --size sd15 --steps ${STEPS:-30}
    ;;
  sdxl)
    run --size sdxl --steps ${STEPS:-20} --gradient-checkpointing --optimizer AdamW8bit --unet-only
    ;;
  *) echo "usage: $0 paths|sd15|sdxl" >&2; exit 2 ;;
esac
