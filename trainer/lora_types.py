"""kohya_ss's LoRA types as data, without torch: which engine trains each, and the ``network_args`` kohya_ss
passes to sd-scripts for it (``kohya_gui/lora_gui.py``), so the run and its file's ``ss_network_args`` match.

The settings' visibility rules, the network build and the metadata all read this one table.
"""
from __future__ import annotations

from dataclasses import dataclass

KOHYA_LORA = "networks.lora"
LYCORIS = "lycoris.kohya"
# sd-scripts' own modules for kohya_ss's Kohya LoHa / Kohya LoKr / Kohya DyLoRA / LoRA-FA (trainer.network builds
# them itself, writing the keys sd-scripts writes)
KOHYA_LOHA = "networks.loha"
KOHYA_LOKR = "networks.lokr"
KOHYA_DYLORA = "networks.dylora"
LORA_FA = "networks.lora_fa"
KOHYA_OWN_MODULES = (KOHYA_LOHA, KOHYA_LOKR, KOHYA_DYLORA, LORA_FA)
# sd-scripts' FLUX.1 LoRA: Nekoya's own LoRA modules on the FLUX family's BFL-layout blocks (its keys)
FLUX_LORA = "networks.lora_flux"
# kohya_ss refuses Kohya LoHa/LoKr unless the SDXL (or Anima) checkbox is ticked: sd-scripts' networks.loha and
# networks.lokr detect only those architectures
SDXL_ONLY_TYPES = ("Kohya LoHa", "Kohya LoKr")

LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only")


@dataclass(frozen=True)
class LoraType:
    name: str  # kohya_ss's dropdown string
    network_module: str  # what sd-scripts imports: networks.lora, lycoris.kohya, networks.loha...
    algo: str = ""  # LyCORIS's algorithm
    conv: bool = False  # the Convolution rank/alpha row applies
    # the network_args kohya_ss writes for this type, in its order: setting names, or "arg=setting"
    args: tuple[str, ...] = ()

    @property
    def lycoris(self) -> bool:
        return self.network_module == LYCORIS

    @property
    def kohya_own(self) -> bool:
        """One of sd-scripts' own LoHa/LoKr/DyLoRA/LoRA-FA modules (not networks.lora, not LyCORIS)."""
        return self.network_module in KOHYA_OWN_MODULES


_PRESET = ("preset=LyCORIS_preset", "conv_dim", "conv_alpha")
# kohya_ss's block-wise settings, in train_model's parameter order
_BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
               "block_alphas", "conv_block_dims", "conv_block_alphas")
_LOCON_ARGS = (*_PRESET, "use_tucker", "rank_dropout", "bypass_mode", "dora_wd", "module_dropout", "use_tucker",
               "use_scalar", "rank_dropout_scale", "algo", "train_norm")

TYPES: dict[str, LoraType] = {t.name: t for t in (
    LoraType("Standard", KOHYA_LORA),
    LoraType("Kohya LoCon", KOHYA_LORA, conv=True),
    LoraType("LyCORIS/LoCon", LYCORIS, "locon", True, _LOCON_ARGS),
    LoraType("LyCORIS/LoHa", LYCORIS, "loha", True, _LOCON_ARGS),
    LoraType("LyCORIS/LoKr", LYCORIS, "lokr", True,
             (*_PRESET, "use_tucker", "rank_dropout", "bypass_mode", "dora_wd", "module_dropout", "factor", "use_cp",
              "use_scalar", "decompose_both", "rank_dropout_scale", "algo", "train_norm")),
    LoraType("LyCORIS/iA3", LYCORIS, "ia3", False, (*_PRESET, "train_on_input", "algo")),
    LoraType("LyCORIS/BOFT", LYCORIS, "boft", True,
             (*_PRESET, "module_dropout", "use_tucker", "rank_dropout", "rank_dropout_scale", "algo", "train_norm")),
    LoraType("LyCORIS/Diag-OFT", LYCORIS, "diag-oft", True,
             (*_PRESET, "module_dropout", "use_tucker", "rank_dropout", "rank_dropout_scale", "constraint=constrain",
              "rescaled", "algo", "train_norm")),
    LoraType("LyCORIS/GLoRA", LYCORIS, "glora", True,
             (*_PRESET, "use_tucker", "rank_dropout", "module_dropout", "rank_dropout_scale", "algo", "train_norm")),
    LoraType("LyCORIS/DyLoRA", LYCORIS, "dylora", True,
             (*_PRESET, "use_tucker", "block_size=unit", "rank_dropout", "module_dropout", "algo", "train_norm")),
    LoraType("LyCORIS/Native Fine-Tuning", LYCORIS, "full", False,
             ("preset=LyCORIS_preset", "rank_dropout", "module_dropout", "rank_dropout_scale", "algo", "train_norm")),
    # kohya_ss's kohya_lora_vars: the settings of its list that are filled in (truthy), in train_model's order
    LoraType("Kohya DyLoRA", KOHYA_DYLORA, conv=True, args=("conv_dim", "conv_alpha", *_BLOCK_ARGS, "unit",
                                                            "rank_dropout", "module_dropout")),
    # kohya_ss's build_native_loha_lokr_network_args: only the options that differ from sd-scripts' defaults
    LoraType("Kohya LoHa", KOHYA_LOHA, conv=True, args=("conv_dim", "conv_alpha", "use_tucker", "rank_dropout",
                                                         "module_dropout")),
    LoraType("Kohya LoKr", KOHYA_LOKR, conv=True, args=("conv_dim", "conv_alpha", "use_tucker", "factor",
                                                         "rank_dropout", "module_dropout")),
    # kohya_ss passes no conv_dim to networks.lora_fa (its convolution row is shown but not used)
    LoraType("LoRA-FA", LORA_FA, conv=False, args=(*_BLOCK_ARGS, "rank_dropout", "module_dropout")),
    LoraType("Flux1", FLUX_LORA),
)}

# kohya_ss's other types: loaded and saved as they are, refused by the check until Nekoya trains them
NOT_YET = ("Flux1 OFT",)
ALL_TYPES = tuple(TYPES) + NOT_YET

# kohya_ss shows the convolution row for these (for LoRA-FA too, although it does not pass conv_dim)
CONV_TYPES = tuple(name for name, t in TYPES.items() if t.conv) + ("LoRA-FA",)
LYCORIS_TYPES = tuple(name for name, t in TYPES.items() if t.lycoris)
# kohya_ss lets these LyCORIS types take a rank up to 100000 (LoKr: a full matrix)
HUGE_RANK_TYPES = ("LyCORIS/LoHa", "LyCORIS/LoKr", "LyCORIS/BOFT", "LyCORIS/Diag-OFT")


def types_using(option: str) -> tuple[str, ...]:
    """The LyCORIS (and Kohya LoHa/LoKr/DyLoRA/LoRA-FA) types whose network_args carry ``option`` (a setting
    name): when its widget is shown, as in kohya_ss (e.g. factor for LyCORIS/LoKr and Kohya LoKr)."""
    return tuple(name for name, t in TYPES.items()
                 if (t.lycoris or t.kohya_own) and any(_setting_of(arg) == option for arg in t.args))


def _setting_of(arg: str) -> str:
    return arg.partition("=")[2] or arg


def lycoris_network_args(settings, lora_type: LoraType) -> dict[str, str]:
    """``network_args`` as kohya_ss writes them for a LyCORIS type (values as sd-scripts receives them: strings)."""
    args = {}
    for arg in lora_type.args:
        key, _, name = arg.partition("=")
        args[key] = lora_type.algo if key == "algo" else arg_text(getattr(settings, name or key))
    return args


def kohya_own_network_args(settings, lora_type: LoraType) -> dict[str, str]:
    """``network_args`` as kohya_ss writes them for Kohya LoHa/LoKr (build_native_loha_lokr_network_args) and for
    Kohya DyLoRA/LoRA-FA (the settings of its list that are filled in), before the LoRA+ ratios."""
    if lora_type.name in SDXL_ONLY_TYPES:
        return _native_loha_lokr_args(settings, lora_type.name == "Kohya LoKr")
    args = {}
    for key in lora_type.args:
        value = getattr(settings, key, None)
        if isinstance(value, str):
            value = value.strip()
        if value:
            args[key] = arg_text(value)
    return args


def _native_loha_lokr_args(settings, lokr: bool) -> dict[str, str]:
    args = {}
    if float(settings.conv_dim or 0) > 0:
        args["conv_dim"] = str(int(settings.conv_dim))
        args["conv_alpha"] = arg_text(float(settings.conv_alpha))
    if settings.use_tucker:
        args["use_tucker"] = "True"
    if lokr and int(settings.factor) != -1:
        args["factor"] = str(int(settings.factor))
    for key in ("rank_dropout", "module_dropout"):
        if float(getattr(settings, key) or 0) > 0:
            args[key] = arg_text(getattr(settings, key))
    return args


def arg_text(value) -> str:
    """As kohya_ss's f-string writes a value loaded from its JSON: 1.0 was 1 there."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
