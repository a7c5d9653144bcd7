"""The LoRA tools' options, each declared once (label, help, default, range, choices).

The Tools tab builds its widgets and ``python -m trainer lora`` its argparse options from
these models, so a default or a range is written here and nowhere else. Torch-free: the
CLI parses its arguments before anything heavy is imported.
"""
from __future__ import annotations

from pydantic import BaseModel

from trainer.settings.field import SettingInfo, option, request_infos

SAVE_PRECISIONS = ("float", "fp16", "bf16")
# sd-scripts' dynamic rank methods, each with a usual parameter (sv_ratio: a ratio to the largest singular
# value; the others: a fraction). trainer.tools.lowrank finds each method's rule by this name.
DYNAMIC_DEFAULTS = {"sv_ratio": 4.0, "sv_fro": 0.9, "sv_cumulative": 0.9}
DYNAMIC_METHODS = tuple(DYNAMIC_DEFAULTS)


class WritesFile(BaseModel):
    overwrite: bool = option(False, label="Overwrite if it exists", help="replace the output file if it exists")


class InspectRequest(BaseModel):
    file: str = option(..., label="LoRA file", cli="file", help="the LoRA file (.safetensors or .ckpt)")
    base: str = option("", label="Base model (optional)", widget="path",
                       help="a base model (diffusers folder or .safetensors/.ckpt) to check every key against")


class ResizeRequest(WritesFile):
    file: str = option(..., label="LoRA file", widget="file", cli="file", help="the LoRA file to resize")
    out: str = option("", label="Output file", widget="file", cli="-o --out",
                      help="empty: <file>-r<rank>.safetensors next to the input")
    rank: int = option(8, label="New rank (max for dynamic)", ge=1,
                       help="new rank (the maximum with a dynamic method)")
    conv_rank: int = option(0, label="Conv rank (0: same)", ge=0, help="new rank of 3x3 conv modules (0: the rank)")
    # None: a fixed rank / the input's precision (the GUI offers that as a choice of its own)
    method: str | None = option(None, label="Method", choices=DYNAMIC_METHODS, cli="--dynamic",
                                help="choose each module's rank: sv_ratio (keep singular values above max/param), "
                                     "sv_cumulative or sv_fro (keep this fraction of the sum / Frobenius norm)")
    param: float | None = option(None, label="Dynamic parameter", widget="number",
                                 help="the dynamic method's parameter: sv_ratio e.g. 4; sv_fro / sv_cumulative e.g. 0.9")
    precision: str | None = option(None, label="Save precision", choices=SAVE_PRECISIONS, cli="--save-precision",
                                   help="default: the input's precision")


class ExtractRequest(WritesFile):
    tuned: str = option(..., label="Fine-tuned model", widget="path", help="the fine-tuned model")
    base: str = option(..., label="Base model (the original)", widget="path", help="the model it was tuned from")
    out: str = option(..., label="Output file", widget="file", cli="-o --out", help="the LoRA file to write (.safetensors)")
    rank: int = option(4, label="Rank", ge=1, help="rank of Linear and 1x1 conv modules")
    conv_rank: int = option(0, label="Conv rank (0: none)", ge=0, help="also extract 3x3 convs (LoCon) at this rank")
    clamp: float = option(0.99, label="Clamp quantile (1: none)", ge=0, le=1, cli="--clamp-quantile",
                          help="clamp factor values beyond this quantile of their magnitudes (as sd-scripts)")
    min_diff: float = option(0.01, label="Min. text-encoder difference", ge=0,
                             help="leave the text encoders out unless a weight differs by more than this")
    precision: str = option("float", label="Save precision", choices=SAVE_PRECISIONS, cli="--save-precision",
                            help="the precision of the saved LoRA's weights")
    load_precision: str = option("float", label="Load precision", choices=SAVE_PRECISIONS,  # command line only
                                 help="load both models in this precision (fp16 halves the memory)")


class MergeRequest(WritesFile):
    base: str = option(..., label="Base model", widget="path", help="the base model (diffusers folder or single file)")
    out: str = option(..., label="Output file", widget="file", cli="-o --out",
                      help="the checkpoint to write: .safetensors or .ckpt")
    ratio: float = option(1.0, label="Ratio", step=0.05, help="a LoRA's weight in the merge")
    half: bool = option(False, label="Save as fp16 (half the size)", help="save in fp16 (half the size)")
    allow_unmatched: bool = option(False, label="Skip modules that match no layer",
                                   help="skip LoRA modules that match no layer of the base (otherwise an error)")


class MergeLorasRequest(WritesFile):
    """sd-scripts' merge_lora.py without --sd_model (kohya_ss's "Merge LoRA"); the files come as (file, ratio) pairs."""
    out: str = option(..., label="Output file", widget="file", cli="-o --out", help="the merged LoRA file to write")
    ratio: float = option(1.0, label="Ratio", step=0.05,
                          help="a LoRA's weight; as in sd-scripts, its lora_down and lora_up are each multiplied by it")
    concat: bool = option(False, label="Concatenate (rank = sum of ranks)",
                          help="stack the LoRAs along the rank instead of adding their factors: any ranks, no "
                               "cross terms, a bigger file; as sd-scripts keeps the first file's alpha, each LoRA's "
                               "change is scaled by its rank / the total rank")
    precision: str = option("float", label="Merge precision", choices=SAVE_PRECISIONS,
                            help="the precision the factors are added in (float is recommended)")
    save_precision: str | None = option(None, label="Save precision", choices=SAVE_PRECISIONS,
                                        help="default: the merge precision")


class SvdMergeRequest(WritesFile):
    """sd-scripts' svd_merge_lora.py (kohya_ss's "Merge LoRA (SVD)"); the files come as (file, ratio) pairs."""
    out: str = option(..., label="Output file", widget="file", cli="-o --out", help="the merged LoRA file to write")
    ratio: float = option(1.0, label="Ratio", step=0.05, help="a LoRA's weight: its weight change is multiplied by it")
    rank: int = option(4, label="New rank", ge=1, help="rank of the merged LoRA's Linear and 1x1 conv modules")
    conv_rank: int = option(0, label="New conv rank (0: same)", ge=0, help="rank of its 3x3 conv modules (0: the rank)")
    clamp: float = option(0.99, label="Clamp quantile (1: none)", ge=0, le=1, cli="--clamp-quantile",
                          help="clamp factor values beyond this quantile of their magnitudes (sd-scripts: 0.99)")
    save_precision: str = option("float", label="Save precision", choices=SAVE_PRECISIONS,
                                 help="the precision of the saved LoRA's weights")


def cli_flags(info: SettingInfo) -> list[str]:
    """The option's command-line flags, or its name alone for a positional argument."""
    return (info.cli or "--" + info.key.replace("_", "-")).split()


def value_type(info: SettingInfo) -> type:
    """The option's value type, without the None an optional one allows."""
    return next((t for t in getattr(info.type, "__args__", ()) if t is not type(None)), info.type)
