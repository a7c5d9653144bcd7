"""What LoRA a run builds: its type, ranks, alphas and dropouts, decided from the settings without torch.

The run plan holds one ``NetworkSpec``; ``trainer.network`` builds the modules from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.flux_lora_args import FluxLoraArgError, FluxLoraPlan, kohya_flux_args
from trainer.lora_blocks import BlockPlan, block_plan
from trainer.lora_types import (FLUX_LORA, KOHYA_DYLORA, KOHYA_LOHA, KOHYA_LOKR, KOHYA_LORA, LORA_FA, LYCORIS, TYPES,
                                kohya_own_network_args, lycoris_network_args)
from trainer.problems import NekoyaError

# LoRA types of kohya_ss that Nekoya trains, and whether they add conv LoRA (trainer.lora_types has the rest).
NETWORK_TYPES = {name: t.conv for name, t in TYPES.items()}
CONV_LORA_TYPES = tuple(name for name, with_conv in NETWORK_TYPES.items() if with_conv)
# the types whose sd-scripts network reads block weights/dims (networks.lora, lora_fa); kohya_ss also passes
# them to networks.dylora, which ignores them: the check says so
BLOCK_TYPES = ("Standard", "Kohya LoCon", "LoRA-FA")


class NetworkConfigError(NekoyaError, ValueError):
    """A network setting cannot be honoured; ``field`` names the setting."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class NetworkSpec:
    rank: int = 4
    alpha: float = 1.0
    conv_rank: int = 0  # 0: no LoRA on 3x3 convs
    conv_alpha: float = 1.0
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # When set (dim_from_weights), exactly these modules are built, with these ranks.
    module_ranks: dict[str, int] | None = field(default=None, compare=False)
    module_alphas: dict[str, float] | None = field(default=None, compare=False)
    blocks: BlockPlan | None = field(default=None, compare=False)  # block-wise ranks and lr weights
    # LoRA+: lora_up weights of the UNet / text encoders learn at lr x ratio (0: off)
    plus_unet: float = 0.0
    plus_text_encoder: float = 0.0
    network_module: str = KOHYA_LORA  # lycoris.kohya: LyCORIS builds the modules, from lycoris_args
    lycoris_args: dict[str, str] = field(default_factory=dict, compare=False)  # kohya_ss's network_args
    # Kohya LoHa/LoKr/DyLoRA/LoRA-FA (sd-scripts' own networks.loha/lokr/dylora/lora_fa): kohya_ss's network_args
    kohya_args: dict[str, str] = field(default_factory=dict, compare=False)
    use_tucker: bool = False  # Kohya LoHa/LoKr: 3x3 convs as a Tucker core and two matrices
    lokr_factor: int = -1  # Kohya LoKr: sd-scripts' factorization factor (-1: the most balanced)
    dylora_unit: int = 1  # Kohya DyLoRA: the rank block trained at each step
    # modules whose names start with a key learn at that lr instead of their role's (FLUX.1's T5: t5xxl_lr)
    prefix_lrs: dict[str, float] = field(default_factory=dict, compare=False)
    # Flux1 (networks.lora_flux): per-module ranks, block selections, in_dims and split_qkv (trainer.flux_lora_args)
    flux: FluxLoraPlan | None = field(default=None, compare=False)

    def plus_ratios(self) -> dict[str, float]:
        """LoRA+ ratios by optimizer role ("unet", "textencoder": trainer.network.targets.Role values)."""
        return {"unet": self.plus_unet, "textencoder": self.plus_text_encoder}

    @property
    def plus_parameters(self) -> tuple[str, ...]:
        """Names of the parameters LoRA+ speeds up: lora_up, and for sd-scripts' LoHa/LoKr (network_base's
        _is_plus_param) also the second Hadamard pair's hada_w2_a and LoKr's lokr_w1*."""
        if self.network_module in (KOHYA_LOHA, KOHYA_LOKR):
            return ("lora_up", "hada_w2_a", "lokr_w1")
        return ("lora_up",)

    @property
    def lycoris(self) -> bool:
        return self.network_module == LYCORIS

    @classmethod
    def from_settings(cls, settings: Any) -> "NetworkSpec":
        if settings.LoRA_type not in NETWORK_TYPES:
            supported = ", ".join(NETWORK_TYPES)
            raise NetworkConfigError(f"LoRA type {settings.LoRA_type!r} is not supported yet; choose {supported}", "LoRA_type")
        lora_type = TYPES[settings.LoRA_type]
        with_conv = lora_type.conv and int(settings.conv_dim) > 0
        dylora, lora_fa = lora_type.network_module == KOHYA_DYLORA, lora_type.network_module == LORA_FA
        return cls(
            blocks=_blocks(settings, int(settings.conv_dim) if with_conv else None),
            rank=int(settings.network_dim),
            alpha=float(settings.network_alpha),
            conv_rank=int(settings.conv_dim) if with_conv else 0,
            # sd-scripts' networks.dylora gives 3x3 convs network_alpha (its conv_alpha is read, not used)
            conv_alpha=float(settings.network_alpha if dylora else settings.conv_alpha),
            dropout=float(settings.network_dropout or 0),
            rank_dropout=float(settings.rank_dropout or 0),
            module_dropout=float(settings.module_dropout or 0),
            # sd-scripts: the role's own ratio, else loraplus_lr_ratio; networks.lora_fa reads none of them
            plus_unet=0.0 if lora_fa else float(settings.loraplus_unet_lr_ratio or settings.loraplus_lr_ratio or 0),
            plus_text_encoder=0.0 if lora_fa else float(settings.loraplus_text_encoder_lr_ratio
                                                        or settings.loraplus_lr_ratio or 0),
            network_module=lora_type.network_module,
            lycoris_args=lycoris_network_args(settings, lora_type) if lora_type.lycoris else {},
            kohya_args=kohya_own_network_args(settings, lora_type) if lora_type.kohya_own else {},
            use_tucker=bool(settings.use_tucker) if lora_type.kohya_own else False,
            lokr_factor=int(settings.factor) if lora_type.kohya_own else -1,
            dylora_unit=int(settings.unit) if dylora else 1,
            prefix_lrs=_prefix_lrs(settings, lora_type.network_module),
            flux=_flux_plan(settings) if lora_type.network_module == FLUX_LORA else None,
        )

    @property
    def conv_layers(self) -> bool:
        """Whether 3x3 convs can get LoRA: a conv rank, block conv ranks or ranks from a file."""
        return self.conv_rank > 0 or self.module_ranks is not None or bool(self.blocks and self.blocks.conv_dims)

    def rank_for(self, layer) -> tuple[int, float]:
        """(rank, alpha) for a layer; rank 0 means "no LoRA here"."""
        if self.module_ranks is not None:
            rank = self.module_ranks.get(layer.lora_name, 0)
            return rank, (self.module_alphas or {}).get(layer.lora_name, rank)
        if self.blocks is not None and layer.lora_name.startswith("lora_unet_"):
            return self.blocks.rank_for(layer.lora_name, conv=layer.kind != "linear")
        if self.flux is not None and layer.lora_name.startswith("lora_unet_"):
            return self.flux.rank(layer.lora_name, self.rank), self.alpha
        if layer.kind == "linear":  # targets.LayerKind.LINEAR (a str enum; targets imports torch)
            return self.rank, self.alpha
        return self.conv_rank, self.conv_alpha

    def split_dims(self, layer) -> list[int] | None:
        """Flux1 with split_qkv: the output widths of a fused Linear's separate LoRAs (sd-scripts' split_dims:
        [3072] * 3 for a double block's qkv, [3072] * 3 + [12288] for a single block's linear1, at FLUX.1's
        width); None for an ordinary module. Ranks from a weights file build ordinary modules, as sd-scripts'
        create_network_from_weights."""
        kind = self.flux.split(layer.lora_name) if self.flux is not None and self.module_ranks is None else None
        if kind is None:
            return None
        hidden = layer.module.in_features
        return [hidden] * 3 if kind == "qkv" else [hidden] * 3 + [layer.module.out_features - 3 * hidden]


def _flux_plan(settings: Any) -> FluxLoraPlan:
    try:
        return FluxLoraPlan.from_args(kohya_flux_args(settings))
    except FluxLoraArgError as exc:
        raise NetworkConfigError(str(exc), exc.field) from None


def _prefix_lrs(settings: Any, network_module: str) -> dict[str, float]:
    """kohya_ss passes [text_encoder_lr, t5xxl_lr] when both are above 0: networks.lora_flux's T5 (lora_te3) learns
    at the second."""
    t5_lr = float(getattr(settings, "t5xxl_lr", 0) or 0)
    if network_module == FLUX_LORA and t5_lr > 0 and float(settings.text_encoder_lr or 0) > 0:
        return {"lora_te3": t5_lr}
    return {}


def _blocks(settings: Any, conv_dim: int | None) -> BlockPlan | None:
    """sd-scripts' block plan for the types it applies to; a wrong block list is refused by name."""
    if settings.LoRA_type not in BLOCK_TYPES:
        return None
    from trainer.families.registry import spec_for_settings
    from trainer.lora_blocks import BlockSettingError

    try:
        return block_plan(settings, spec_for_settings(settings).sgm_lora_names, conv_dim, float(settings.conv_alpha))
    except BlockSettingError as exc:
        raise NetworkConfigError(str(exc), exc.field) from None
