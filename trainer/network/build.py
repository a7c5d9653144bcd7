"""The network of a run: which roles get LoRA, ranks from settings or a weights file."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from trainer.flux_lora_args import kohya_flux_args
from trainer.lora_blocks import BLOCK_KEYS
from trainer.lora_types import FLUX_LORA, KOHYA_OWN_MODULES, arg_text

from .network import LoRANetwork, NetworkConfigError, NetworkSpec
from .targets import Role
from .weights import ranks_and_alphas, read_lora_file


def learning_rates(settings: Any) -> dict[Role, float]:
    """kohya_ss: a role whose lr is 0 is not trained (and absent from the file); both 0 means
    both use the single Learning rate (``settings.train_lrs()``)."""
    unet_lr, te_lr = settings.train_lrs()
    return {Role.UNET: float(unet_lr or 0.0), Role.TEXT_ENCODER: float(te_lr or 0.0)}


def build_network(spec: NetworkSpec, settings: Any, family: Any, lrs: dict[Role, float], log,
                  init_generator: torch.Generator | None = None) -> LoRANetwork:
    """The run's LoRA, from its plan's spec (ranks from the weights file instead with dim_from_weights);
    ``init_generator`` draws its initial weights."""
    weights = None
    if settings.network_weights:
        weights = read_lora_file(settings.network_weights)
        if settings.dim_from_weights:
            ranks, alphas = ranks_and_alphas(weights)
            spec = replace(spec, module_ranks=ranks, module_alphas=alphas)
    targets = [t for t in family.lora_targets() if lrs.get(t.role, 0.0) > 0]
    if not targets:
        raise NetworkConfigError("every learning rate is 0: nothing to train", "learning_rate")
    network = LoRANetwork.build(targets, spec, init_generator)
    if not network.lora_modules():
        raise NetworkConfigError(f"{settings.network_weights} has no module for this model", "network_weights")
    if weights is not None:
        _load_weights(network, weights, settings.network_weights, log)
    return network


def _load_weights(network: LoRANetwork, weights: dict, path: str, log) -> None:
    missing, unexpected = network.load_lora_state_dict(weights)
    loaded = len(network.lora_modules()) - len({k.split(".")[0] for k in missing})
    log(f"continuing from {path}: {loaded} of {len(network.lora_modules())} LoRA modules loaded", "info")
    if missing:
        log(f"{len({k.split('.')[0] for k in missing})} modules are not in the weights file and start fresh", "warning")
    if unexpected:
        log(f"{len({k.split('.')[0] for k in unexpected})} modules of the weights file are not trained in this run "
            "(e.g. text encoder keys with text encoder lr 0) and are left out", "warning")


def network_args(settings: Any, spec: NetworkSpec) -> dict[str, str]:
    """``ss_network_args`` as kohya_ss passes them to sd-scripts (only the ones in use)."""
    if spec.network_module in KOHYA_OWN_MODULES:  # Kohya LoHa/LoKr/DyLoRA/LoRA-FA: kohya_ss's own recipes
        args = dict(spec.kohya_args)
    elif spec.lycoris:
        args = dict(spec.lycoris_args)
    else:
        args = kohya_flux_args(settings) if spec.network_module == FLUX_LORA else {}
        if spec.conv_rank:
            args.update(conv_dim=str(spec.conv_rank), conv_alpha=str(spec.conv_alpha))
        for key in BLOCK_KEYS:  # kohya_ss passes the block settings that are filled in, as written (not to Flux1)
            if spec.network_module != FLUX_LORA and str(getattr(settings, key, "") or "").strip():
                args[key] = str(getattr(settings, key)).strip()
        if spec.rank_dropout:
            args["rank_dropout"] = str(spec.rank_dropout)
        if spec.module_dropout:
            args["module_dropout"] = str(spec.module_dropout)
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if getattr(settings, key, 0):  # kohya_ss appends the LoRA+ ratios that are not 0
            args[key] = arg_text(getattr(settings, key))
    return args

