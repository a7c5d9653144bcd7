"""Kohya LoHa, Kohya LoKr, Kohya DyLoRA and LoRA-FA (sd-scripts' networks.loha/lokr/dylora/lora_fa): what kohya_ss
and sd-scripts refuse is refused here by name, and the settings those networks do not read are named instead of
silently ignored."""
from __future__ import annotations

from trainer.lora_types import KOHYA_DYLORA, LORA_FA, SDXL_ONLY_TYPES, TYPES
from trainer.preflight.families import checked_family
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

LOHA_LOKR_MODULES = {"Kohya LoHa": "networks.loha", "Kohya LoKr": "networks.lokr"}


@preflight_check("network.kohya_types")
def check_kohya_types(ctx: CheckContext):
    s = ctx.settings
    lora_type = TYPES.get(s.LoRA_type)
    if lora_type is None or not lora_type.kohya_own:
        return
    if s.LoRA_type in SDXL_ONLY_TYPES:
        yield from _loha_lokr(ctx)
    elif lora_type.network_module == KOHYA_DYLORA:
        yield from _dylora(ctx)
    elif lora_type.network_module == LORA_FA and _loraplus(s):
        yield Problem("warning", "loraplus_lr_ratio", "the LoRA+ ratios have no effect on LoRA-FA: sd-scripts' "
                      "networks.lora_fa does not read them (kohya_ss passes them all the same)", fix="set them to 0")


def _loha_lokr(ctx: CheckContext):
    s = ctx.settings
    family = checked_family(s, ctx.model.family if ctx.model is not None else None)
    if not family.sgm_lora_names:
        # sd-scripts detects SDXL by its UNet (the SGM layout, whose names SDXL LoRAs carry); kohya_ss refuses the
        # run unless the SDXL (or Anima) checkbox is ticked
        yield Problem("error", "LoRA_type", f"{s.LoRA_type} is not supported on {family.label} models: it requires "
                      f"SDXL (sd-scripts' {LOHA_LOKR_MODULES[s.LoRA_type]} detects only SDXL and Anima models, and "
                      "kohya_ss refuses it otherwise)",
                      fix=f"use an SDXL model, or choose LyCORIS/{s.LoRA_type.split()[-1]} for this model")
    if s.network_dropout:
        yield Problem("warning", "network_dropout", f"network_dropout = {s.network_dropout:g} has no effect on "
                      f"{s.LoRA_type}: its modules do not read it (as in sd-scripts)",
                      fix="set it to 0, or use Rank dropout / Module dropout")
    if s.scale_weight_norms:
        yield Problem("warning", "scale_weight_norms", f"Scale weight norms has no effect on {s.LoRA_type}: "
                      "sd-scripts' network has no max-norm rule and turns it off", fix="set it to 0")


def _dylora(ctx: CheckContext):
    s = ctx.settings
    unit = int(s.unit)
    if unit < 1 or int(s.network_dim) % unit:
        yield Problem("error", "unit", f"the Network Rank ({s.network_dim}) must be a multiple of the DyLoRA unit "
                      f"({unit}): sd-scripts' networks.dylora stops on it", fix="choose a unit that divides the rank")
    if s.conv_dim > 0 and int(s.conv_dim) != int(s.network_dim):
        yield Problem("error", "conv_dim", f"Kohya DyLoRA needs the Convolution Rank ({s.conv_dim}) equal to the "
                      f"Network Rank ({s.network_dim}): sd-scripts' networks.dylora stops on it",
                      fix=f"set Convolution Rank to {s.network_dim}, or to 0 for no 3x3 convolutions")
    elif s.conv_dim > 0 and float(s.conv_alpha) != float(s.network_alpha):
        yield Problem("note", "conv_alpha", f"Kohya DyLoRA's 3x3 convolutions use the Network Alpha "
                      f"({s.network_alpha:g}): sd-scripts' networks.dylora reads Convolution Alpha but does not use it")
    for key, label in (("network_dropout", "Network dropout"), ("rank_dropout", "Rank dropout"),
                       ("module_dropout", "Module dropout")):
        if getattr(s, key):
            yield Problem("warning", key, f"{label} has no effect on Kohya DyLoRA: sd-scripts' networks.dylora has no "
                          "dropout", fix="set it to 0")
    if s.scale_weight_norms:
        yield Problem("warning", "scale_weight_norms", "Scale weight norms has no effect on Kohya DyLoRA: sd-scripts' "
                      "network has no max-norm rule and turns it off", fix="set it to 0")
    trains_text_encoders = bool(s.train_lrs()[1]) and not s.sdxl_cache_text_encoder_outputs
    if trains_text_encoders and checked_family(s, ctx.model.family if ctx.model is not None else None).sgm_lora_names:
        yield Problem("note", "LoRA_type", "on SDXL, sd-scripts' networks.dylora names the modules of both text "
                      "encoders lora_te_... (in its file the second encoder's overwrite the first's); Nekoya names "
                      "them lora_te1_... and lora_te2_..., as sd-scripts' other SDXL networks and SDXL loaders do")


def _loraplus(s) -> bool:
    return any(getattr(s, key, 0) for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                               "loraplus_text_encoder_lr_ratio"))
