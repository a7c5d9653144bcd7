"""Block-wise LoRA settings (block dims/alphas, down/mid/up lr weights): refused by name before any loading
when sd-scripts could not use them (wrong count, not numbers, unknown curve)."""
from __future__ import annotations

from trainer.families.registry import spec_for_settings
from trainer.lora_blocks import BLOCK_KEYS, BlockSettingError, block_plan
from trainer.network_spec import BLOCK_TYPES
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem


@preflight_check("network.blocks")
def check_blocks(ctx: CheckContext):
    s = ctx.settings
    if s.LoRA_type not in BLOCK_TYPES:
        yield from _not_read(s)
        return
    try:  # the family the model flags choose names the blocks (SGM names: 23 blocks)
        plan = block_plan(s, spec_for_settings(s).sgm_lora_names, int(s.conv_dim) or None, float(s.conv_alpha))
    except BlockSettingError as exc:
        yield Problem("error", exc.field, str(exc))
        return
    if plan is None:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_zero_threshold"):
            if str(getattr(s, key) or "").strip():
                yield Problem("warning", key, f"{key} has no effect without Block dims or Down/Mid/Up LR weights "
                              "(sd-scripts uses the block settings only with one of those)",
                              fix="fill in Block dims (or LR weights), or clear this field")
        return
    if not any(plan.dims) and not any(plan.conv_dims or ()):
        yield Problem("error", "down_lr_weight", "every UNet block has weight 0 or rank 0: the LoRA would have no "
                      "UNet module", fix="give some block a weight above Blocks LR zero threshold")


def _not_read(s):
    """kohya_ss passes the block settings to every Kohya type, but only networks.lora and lora_fa read them."""
    for key in BLOCK_KEYS:
        value = str(getattr(s, key) or "").strip()
        if value:
            yield Problem("warning", key, f"{key} = {value!r} has no effect on {s.LoRA_type}: its sd-scripts network "
                          "does not read block settings", fix="clear it, or choose Standard, Kohya LoCon or LoRA-FA")
