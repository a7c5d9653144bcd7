"""A warning before training when the chosen LoRA type or option makes a file AUTOMATIC1111 or ComfyUI do not
apply as trained (trainer.client_support has the measured table)."""
from __future__ import annotations

from trainer.client_support import client_limits
from trainer.lora_types import TYPES, lycoris_network_args
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem


@preflight_check("network.clients")
def check_client_support(ctx: CheckContext):
    s = ctx.settings
    lora_type = TYPES.get(s.LoRA_type)
    if lora_type is None or not lora_type.lycoris:
        return
    for limit in client_limits(lora_type.algo, lycoris_network_args(s, lora_type)):
        field = "dora_wd" if limit.startswith("DoRA") else ("use_tucker" if "Tucker" in limit else "LoRA_type")
        yield Problem("warning", field, f"the file will not work everywhere: {limit}",
                      fix="choose another type or option if you generate with that program")
