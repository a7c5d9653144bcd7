"""The LoRA network: every LoRA module of a run, its optimizer groups and its file keys.

Modules are registered under their kohya names, so ``state_dict()`` keys are exactly
the keys of the saved file: ``<lora_name>.lora_down.weight``, ``.lora_up.weight``
and ``.alpha``.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from trainer.network_spec import NETWORK_TYPES, NetworkConfigError, NetworkSpec  # noqa: F401 (their home before)

from trainer.lora_blocks import BlockPlan, block_index

from .module import DropoutDraws, LoRAModule
from .split_qkv import SplitLoRAModule
from .targets import LoraTarget, Role, TargetLayer, find_target_layers


class LoRANetwork(nn.Module):
    def __init__(self, layers: Iterable[TargetLayer], spec: NetworkSpec,
                 init_generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.roles: dict[str, Role] = {}
        for layer in layers:
            rank, alpha = spec.rank_for(layer)
            if rank <= 0:
                continue
            split_dims = spec.split_dims(layer)  # Flux1's split_qkv: a LoRA per part of a fused Linear
            if split_dims:
                module = SplitLoRAModule(layer.lora_name, layer.module, rank, alpha, split_dims, spec.dropout,
                                         spec.rank_dropout, spec.module_dropout, init_generator)
            else:
                module = LoRAModule(
                    layer.lora_name, layer.module, rank, alpha, spec.dropout, spec.rank_dropout, spec.module_dropout,
                    init_generator,
                )
            self.add_module(layer.lora_name, module)
            self.roles[layer.lora_name] = layer.role
        self.dropout_draws: DropoutDraws | None = None
        # the weights to save and sample with: a Schedule-Free optimizer swaps its averaged ones in meanwhile
        self.eval_weights = contextlib.nullcontext
        self._batch_size = [1]  # one list shared by every module (see LoRAModule.batch_size_ref)
        for module in self.lora_modules():
            module.batch_size_ref = self._batch_size

    @classmethod
    def build(cls, targets: Iterable[LoraTarget], spec: NetworkSpec,
              init_generator: torch.Generator | None = None) -> "LoRANetwork":
        """``init_generator`` draws the initial down weights (the global RNG when None)."""
        from trainer.lora_types import KOHYA_OWN_MODULES

        kohya_own = spec.network_module in KOHYA_OWN_MODULES
        if spec.lycoris and not kohya_own:
            from .lycoris_modules import build_lycoris_modules

            return cls.of_modules(build_lycoris_modules(list(targets), spec, init_generator))
        with_conv = spec.conv_layers
        layers = [layer for target in targets for layer in find_target_layers(target, with_conv)]
        if kohya_own:
            return cls._of_kohya_type(layers, spec, init_generator)
        return cls(layers, spec, init_generator)

    @classmethod
    def _of_kohya_type(cls, layers: list[TargetLayer], spec: NetworkSpec,
                       init_generator: torch.Generator | None) -> "LoRANetwork":
        """Kohya LoHa/LoKr/DyLoRA/LoRA-FA: sd-scripts' own modules on the layers networks.lora would train
        (trainer.network.kohya_types)."""
        from .kohya_types import build_kohya_type_modules

        network = cls.of_modules(build_kohya_type_modules(layers, spec, init_generator))
        for module in network.lora_modules():
            if isinstance(module, LoRAModule):  # LoRA-FA: rank dropout masks each sample of the batch
                module.batch_size_ref = network._batch_size
        return network

    @classmethod
    def of_modules(cls, modules: Iterable[tuple[str, nn.Module, Role]]) -> "LoRANetwork":
        """A network of modules built elsewhere (LyCORIS's), under their kohya names."""
        network = cls([], NetworkSpec())
        for name, module, role in modules:
            network.add_module(name, module)
            network.roles[name] = role
        return network

    # -- wiring ---------------------------------------------------------------
    def lora_modules(self, role: Role | None = None) -> list[LoRAModule]:
        return [m for name, m in self.named_children() if role is None or self.roles[name] is role]

    def apply_to(self) -> None:
        for module in self.lora_modules():
            module.apply_to()

    def restore(self) -> None:
        for module in self.lora_modules():
            module.restore()

    def set_batch_size(self, samples: int) -> None:
        """Samples in the batch about to run: rank dropout draws one mask per sample even where the lean
        models pass tokens as rows (batch * tokens, features)."""
        self._batch_size[0] = max(1, int(samples))

    def set_dropout_generator(self, generator: torch.Generator) -> None:
        """The (CPU) generator the dropouts draw from, instead of the global RNG; draws change with each
        ``next_dropout_draws``."""
        self.dropout_draws = DropoutDraws(generator)
        for key, module in enumerate(self.lora_modules()):
            module.draws, module.draw_key = self.dropout_draws, key

    @property
    def dropout_generator(self) -> torch.Generator | None:
        return self.dropout_draws.generator if self.dropout_draws is not None else None

    def next_dropout_draws(self) -> None:
        """A new batch: new dropout masks (the same ones again when a checkpointed block recomputes)."""
        if self.dropout_draws is not None:
            self.dropout_draws.next_batch()

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.lora_modules():
            module.multiplier = multiplier

    # -- training ---------------------------------------------------------------
    def param_groups(self, lrs: dict[Role, float], plus_ratios: dict[str, float] | None = None,
                     blocks: BlockPlan | None = None, plus_parameters: tuple[str, ...] = ("lora_up",),
                     prefix_lrs: dict[str, float] | None = None) -> list[dict]:
        """One optimizer group per role with a LoRA and a non-zero learning rate. With a LoRA+ ratio for the
        role, its ``plus_parameters`` (lora_up...) form a second group at lr x ratio (sd-scripts' and LyCORIS's rule).
        With block lr weights, the UNet's modules are grouped by block at lr x the block's weight. ``prefix_lrs``:
        the modules whose names start with a key form their own group at that lr (FLUX.1's T5, t5xxl_lr)."""
        groups = []
        for role in Role:
            lr, ratio = lrs.get(role, 0.0), (plus_ratios or {}).get(role.value, 0.0)
            modules = self.lora_modules(role)
            for prefix, prefix_lr in (prefix_lrs or {}).items():
                own = [m for m in modules if getattr(m, "lora_name", "").startswith(prefix)]
                if own and lr:
                    modules = [m for m in modules if m not in own]
                    groups += _module_groups(own, prefix_lr, ratio, f"{role.value} {prefix}", plus_parameters)
            if role is Role.UNET and blocks is not None and blocks.lr_weights is not None:
                by_block: dict[int, list[nn.Module]] = {}
                for module in modules:
                    by_block.setdefault(block_index(module.lora_name, blocks.sgm_names), []).append(module)
                for index, members in by_block.items():
                    weight = blocks.lr_weight(members[0].lora_name)
                    groups += _module_groups(members, lr * weight, ratio, f"unet_block{index}", plus_parameters)
            else:
                groups += _module_groups(modules, lr, ratio, role.value, plus_parameters)
        return groups

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """sd-scripts' scale_weight_norms: shrink modules whose ΔW norm exceeds ``max_norm``.

        Returns (modules scaled, mean norm, max norm) after scaling, for logging.
        """
        scaled, norms = 0, []
        with torch.no_grad():
            for module in self.lora_modules():
                if not isinstance(module, LoRAModule):  # LyCORIS modules scale themselves
                    was_scaled, norm = module.apply_max_norm(max_norm, None)
                    if was_scaled is not None:
                        scaled += int(was_scaled)
                        norms.append(float(norm))
                    continue
                raw = module.delta_weight().norm()
                norm = raw.clamp(min=max_norm / 2)
                ratio = (torch.clamp(norm, max=max_norm) / norm).item()
                if ratio != 1.0:
                    scaled += 1
                    for weight in _weights(module):
                        weight.mul_(ratio**0.5)
                norms.append(raw.item() * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # -- file keys -----------------------------------------------------------------
    def lora_state_dict(self, dtype: torch.dtype | None = None, copy: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of the LoRA file: kohya keys, contiguous CPU tensors, alpha included. Without ``copy`` a
        CPU network's tensors of the same dtype are its live weights; with it, always a copy (one, not two)."""
        swapped = self.eval_weights is not contextlib.nullcontext  # shared tensors would change back after
        with self.eval_weights():
            return {
                key: value.detach().to("cpu", dtype=dtype or value.dtype, copy=copy or swapped).contiguous()
                for key, value in self.state_dict().items()
            }

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load kohya-keyed tensors; returns (missing, unexpected) keys. Ranks must match."""
        own = self.state_dict()
        for key, value in tensors.items():
            if key in own and own[key].shape != value.shape:
                raise NetworkConfigError(
                    f"{key} has shape {tuple(value.shape)} in the weights file but {tuple(own[key].shape)} here; "
                    "tick 'DIM from weights' to take the ranks from the file",
                    "network_weights",
                )
        result = self.load_state_dict(tensors, strict=False)
        for module in self.lora_modules():  # alpha may come from the file
            if isinstance(module, LoRAModule):
                module.scale = module.alpha.item() / module.rank
        return list(result.missing_keys), list(result.unexpected_keys)


def _weights(module: LoRAModule) -> list[torch.Tensor]:
    """A module's down and up weights (split_qkv's: each part's)."""
    layers = [*module.lora_down, *module.lora_up] if isinstance(module, SplitLoRAModule) else [module.lora_down,
                                                                                               module.lora_up]
    return [layer.weight for layer in layers]


def _module_groups(modules: list[nn.Module], lr: float, ratio: float, name: str,
                   plus_parameters: tuple[str, ...]) -> list[dict]:
    """The optimizer groups of these modules at ``lr``: LoRA+ puts their ``plus_parameters`` apart."""
    if not lr:
        return []
    named = [(n, p) for m in modules for n, p in m.named_parameters()]
    is_plus = [bool(ratio) and any(marker in n for marker in plus_parameters) for n, _ in named]
    plus = [p for (_, p), fast in zip(named, is_plus) if fast]
    rest = [p for (_, p), fast in zip(named, is_plus) if not fast]
    groups = [{"params": rest, "lr": lr, "name": name}] if rest else []
    return groups + ([{"params": plus, "lr": lr * ratio, "name": f"{name} plus"}] if plus else [])
