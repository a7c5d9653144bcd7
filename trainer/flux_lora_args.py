"""kohya_ss's Flux1 LoRA-type network_args and what sd-scripts' ``networks.lora_flux`` makes of them, without torch.

kohya_ss (``lora_gui.py``, LoRA type "Flux1") passes ``img_attn_dim`` ... ``single_mod_dim``, ``in_dims`` and the
two block selections when they are filled in, then ``train_blocks=single`` (split_mode), ``split_qkv=True`` and
``train_t5xxl=True``. ``FluxLoraPlan.from_args`` reads those strings as ``create_network`` does; its ``rank`` and
``split`` are ``LoRANetwork.__init__``'s rules for each ``lora_unet_`` module:

- a per-module dim replaces the Network Rank of the modules whose name holds its identifiers (the first match in
  sd-scripts' type_dims order); 0 leaves them out;
- a block selection ("all", "none", "0,1,5" or ranges such as "0-5,10") leaves the other blocks' modules out
  (sd-scripts counts 19 double and 38 single blocks);
- ``in_dims`` = [img_in, time_in, vector_in, guidance_in, txt_in] ranks for the input embedders (0: none);
- ``split_qkv`` trains separate q/k/v (and single blocks' MLP input) LoRAs on the fused Linears; the file keeps
  one module, its down weights stacked and its up weight block-diagonal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.families.flux_spec import DOUBLE_BLOCKS, SINGLE_BLOCKS
from trainer.problems import NekoyaError

# kohya_ss's kohya_lora_var_list for Flux1, in its (train_model's parameter) order
DIM_KEYS = ("img_attn_dim", "img_mlp_dim", "img_mod_dim", "single_dim", "txt_attn_dim", "txt_mlp_dim", "txt_mod_dim",
            "single_mod_dim")
KOHYA_FLUX_VARS = (*DIM_KEYS, "in_dims", "train_double_block_indices", "train_single_block_indices")
# sd-scripts' type_dims order and the name parts each one matches
TYPE_IDENTIFIERS = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
                    ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
                    ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))
IN_EMBEDDERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")  # in_dims' order
BLOCK_SELECTIONS = {"train_double_block_indices": DOUBLE_BLOCKS, "train_single_block_indices": SINGLE_BLOCKS}
_BLOCK_PREFIXES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")


class FluxLoraArgError(NekoyaError, ValueError):
    """A Flux1 network setting sd-scripts would refuse; ``field`` names the setting."""

    def __init__(self, what: str, field: str, fix: str) -> None:
        super().__init__(f"{what}: {fix}")
        self.what, self.field, self.fix = what, field, fix


def kohya_flux_args(settings: Any) -> dict[str, str]:
    """kohya_ss's Flux1 network_args (before the dropouts and LoRA+ ratios it appends), as sd-scripts gets them."""
    args = {}
    for key in KOHYA_FLUX_VARS:  # kohya_ss passes the ones that are filled in
        value = str(getattr(settings, key, "") or "").strip()
        if value:
            args[key] = value
    if getattr(settings, "split_mode", False):
        args["train_blocks"] = "single"
    if getattr(settings, "split_qkv", False):
        args["split_qkv"] = "True"
    if getattr(settings, "train_t5xxl", False):
        args["train_t5xxl"] = "True"
    return args


@dataclass(frozen=True)
class FluxLoraPlan:
    split_qkv: bool = False
    type_dims: tuple[tuple[str, int], ...] = ()  # (setting, rank) of the per-module dims given
    in_dims: tuple[int, ...] | None = None
    double_blocks: tuple[bool, ...] | None = None  # None: every block
    single_blocks: tuple[bool, ...] | None = None

    @classmethod
    def from_args(cls, args: dict[str, str]) -> "FluxLoraPlan":
        """create_network's reading of the args; a value it would refuse raises ``FluxLoraArgError``."""
        dims = {key: _rank(key, args[key]) for key in DIM_KEYS if key in args}
        return cls(
            split_qkv=args.get("split_qkv") == "True",
            type_dims=tuple((key, dims[key]) for key, _ in TYPE_IDENTIFIERS if key in dims),
            in_dims=_in_dims(args["in_dims"]) if "in_dims" in args else None,
            double_blocks=_selection("train_double_block_indices", args.get("train_double_block_indices")),
            single_blocks=_selection("train_single_block_indices", args.get("train_single_block_indices")),
        )

    @property
    def embedders(self) -> bool:
        """Whether the input embedders get modules (sd-scripts: ``if self.in_dims``)."""
        return bool(self.in_dims)

    def rank(self, lora_name: str, rank: int) -> int:
        """The rank of a ``lora_unet_`` module given the Network Rank (0: no module)."""
        if not lora_name.startswith(_BLOCK_PREFIXES):  # an input embedder: its in_dims entry
            for embedder, dim in zip(IN_EMBEDDERS, self.in_dims or ()):
                if lora_name == f"lora_unet_{embedder}" or lora_name.startswith(f"lora_unet_{embedder}_"):
                    return dim
            return 0
        for key, dim in self.type_dims:
            if all(part in lora_name for part in dict(TYPE_IDENTIFIERS)[key]):
                rank = dim
                break
        if rank and (self.double_blocks is not None or self.single_blocks is not None):
            index = int(lora_name.split("_")[4])  # lora_unet_double_blocks_<i>_...
            selection = self.double_blocks if "double" in lora_name else self.single_blocks
            if selection is not None and not selection[index]:
                return 0
        return rank

    def split(self, lora_name: str) -> str | None:
        """With split_qkv: "qkv" for a double block's fused q/k/v, "linear1" for a single block's q/k/v + MLP input."""
        if not self.split_qkv or not lora_name.startswith("lora_unet_"):
            return None
        if "double" in lora_name and "qkv" in lora_name:
            return "qkv"
        if "single" in lora_name and "linear1" in lora_name:
            return "linear1"
        return None


def _rank(key: str, value: str) -> int:
    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise FluxLoraArgError(f"{key} {value!r} is not a rank", key, "write a whole number such as 8 (0 leaves "
                               "these modules out), or leave it empty for the Network Rank")
    return rank


def _in_dims(value: str) -> tuple[int, ...]:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 5 or min(dims) < 0:
        raise FluxLoraArgError(f"in_dims {value!r} is not five ranks", "in_dims", "write the ranks of img_in, time_in, "
                               "vector_in, guidance_in and txt_in, such as [4,0,0,0,4] (0: no LoRA there), or leave "
                               "it empty")
    return dims


def _selection(key: str, value: str | None) -> tuple[bool, ...] | None:
    """sd-scripts' parse_block_selection: "all", "none", indices and inclusive ranges, counted over FLUX.1's blocks."""
    if value is None:
        return None
    total = BLOCK_SELECTIONS[key]
    if value in ("all", "none", ""):
        return (value == "all",) * total
    selected = [False] * total
    try:
        for part in value.split(","):
            start, end = (map(str.strip, part.split("-")) if "-" in part else (part, part))
            start, end = int(start), int(end)
            if not (0 <= start <= end < total):
                raise ValueError
            selected[start:end + 1] = [True] * (end - start + 1)
    except ValueError:
        raise FluxLoraArgError(f"{key} {value!r} is not a block selection", key, "write 'all', 'none', or indices "
                               f"and ranges from 0 to {total - 1} such as '0-5,10'") from None
    return tuple(selected)
