"""kohya_ss's LoRA types as data, without torch: which engine trains each, and the ``network_args`` kohya_ss
passes to sd-scripts for it (``kohya_gui/lora_gui.py``), so the run and its file's ``ss_network_args`` match.

The settings' visibility rules, the network build and the metadata all read this one table.
"""
from __future__ import annotations

from dataclasses import dataclass

KOHYA_LORA = "networks.lora"
LYCORIS = "lycoris.kohya"

LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only")


@dataclass(frozen=True)
class LoraType:
    name: str  # kohya_ss's dropdown string
    network_module: str  # what sd-scripts imports: networks.lora or lycoris.kohya
    algo: str = ""  # LyCORIS's algorithm
    conv: bool = False  # the Convolution rank/alpha row applies
    # the network_args kohya_ss writes for this type, in its order: setting names, or "arg=setting"
    args: tuple[str, ...] = ()

    @property
    def lycoris(self) -> bool:
        return self.network_module == LYCORIS


_PRESET = ("preset=LyCORIS_preset", "conv_dim", "conv_alpha")
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
)}

# kohya_ss's other types: loaded and saved as they are, refused by the check until Nekoya trains them
NOT_YET = ("Kohya DyLoRA", "Kohya LoHa", "Kohya LoKr", "LoRA-FA", "Flux1", "Flux1 OFT")
ALL_TYPES = tuple(TYPES) + NOT_YET

CONV_TYPES = tuple(name for name, t in TYPES.items() if t.conv) + ("Kohya DyLoRA", "Kohya LoHa", "Kohya LoKr", "LoRA-FA")
LYCORIS_TYPES = tuple(name for name, t in TYPES.items() if t.lycoris)
# kohya_ss lets these LyCORIS types take a rank up to 100000 (LoKr: a full matrix)
HUGE_RANK_TYPES = ("LyCORIS/LoHa", "LyCORIS/LoKr", "LyCORIS/BOFT", "LyCORIS/Diag-OFT")


def types_using(option: str) -> tuple[str, ...]:
    """The LyCORIS types whose network_args carry ``option`` (a setting name): when its widget is shown."""
    return tuple(name for name, t in TYPES.items() if t.lycoris and any(_setting_of(arg) == option for arg in t.args))


def _setting_of(arg: str) -> str:
    return arg.partition("=")[2] or arg


def lycoris_network_args(settings, lora_type: LoraType) -> dict[str, str]:
    """``network_args`` as kohya_ss writes them for a LyCORIS type (values as sd-scripts receives them: strings)."""
    args = {}
    for arg in lora_type.args:
        key, _, name = arg.partition("=")
        args[key] = lora_type.algo if key == "algo" else arg_text(getattr(settings, name or key))
    return args


def arg_text(value) -> str:
    """As kohya_ss's f-string writes a value loaded from its JSON: 1.0 was 1 there."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
