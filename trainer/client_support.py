"""Which image generators load which LoRA types correctly, as measured with their own loading code
(ComfyUI a125cd8, AUTOMATIC1111 v1.10.1; see the README's LoRA types table). Torch-free: the check warns
before training, and the tools say it of a file."""
from __future__ import annotations

from typing import Any

# (what, clients that do not load it correctly and why)
_ALGO_LIMITS = {
    "ia3": ("iA3", "ComfyUI has no iA3 loader (the file is ignored there); AUTOMATIC1111 loads it"),
    "glora": ("GLoRA", "AUTOMATIC1111 implements only the old GLoRA layout and does not load this file; ComfyUI does"),
}


def client_limits(algo: str, options: dict[str, Any]) -> list[str]:
    """What a file of this LyCORIS algorithm and these options cannot do in AUTOMATIC1111 or ComfyUI."""
    limits = []
    if algo in _ALGO_LIMITS:
        name, why = _ALGO_LIMITS[algo]
        limits.append(f"{name}: {why}")
    if _true(options.get("dora_wd")):
        limits.append("DoRA (dora_wd): AUTOMATIC1111 normalises DoRA per input column and ComfyUI by the original "
                      "weight, so neither reproduces what LyCORIS trained (A1111 is far off, ComfyUI about 18 %)")
    if algo == "lokr" and (_true(options.get("use_tucker")) or _true(options.get("use_cp"))):
        limits.append("LoKr with Tucker/CP decomposition: ComfyUI fails on the 3x3 conv modules (torch.kron); "
                      "AUTOMATIC1111 loads it")
    return limits


def _true(value: Any) -> bool:
    return str(value).strip().lower() == "true" if not isinstance(value, bool) else value
