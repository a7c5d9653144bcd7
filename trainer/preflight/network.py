"""LoRA network checks: type, rank and alpha, and the weights file to continue from."""
from __future__ import annotations

from pathlib import Path

from trainer.checkpoints.integrity import read_safetensors_header, safetensors_problem, weights_file_problem
from trainer.network_spec import CONV_LORA_TYPES, NETWORK_TYPES
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

# The types trainer.network builds, from the one torch-free table of them
SUPPORTED_LORA_TYPES = tuple(NETWORK_TYPES)
WEIGHTS_FIX = "copy the file again, or choose another LoRA file (or clear the field to start a new LoRA)"


@preflight_check("network.type")
def check_network_type(ctx: CheckContext):
    s = ctx.settings
    if s.LoRA_type not in SUPPORTED_LORA_TYPES:
        yield Problem("error", "LoRA_type", f"{s.LoRA_type!r} is not supported by Nekoya yet",
                      fix="choose " + ", ".join(SUPPORTED_LORA_TYPES))
    if s.stop_text_encoder_training:
        yield Problem("note", "stop_text_encoder_training", "is not supported for LoRA (as in kohya_ss) and is ignored",
                      fix="set Text Encoder learning rate to 0 to train the UNet only")


@preflight_check("network.rank_alpha")
def check_rank_alpha(ctx: CheckContext):
    s = ctx.settings
    pairs = [("network_alpha", s.network_alpha, "network_dim", s.network_dim)]
    if s.LoRA_type in CONV_LORA_TYPES and s.conv_dim > 0:
        pairs.append(("conv_alpha", s.conv_alpha, "conv_dim", s.conv_dim))
    for alpha_key, alpha, rank_key, rank in pairs:
        if alpha > rank:
            yield Problem("warning", alpha_key, f"alpha ({alpha:g}) is greater than the rank ({rank}): the LoRA's updates "
                          f"are multiplied by {alpha / rank:g}, which acts like a learning rate {alpha / rank:g} times higher",
                          fix=f"use an alpha of at most the rank (e.g. {max(1, rank // 2)} or {rank}), or lower the learning rate")
        elif alpha == 0:
            yield Problem("note", alpha_key, f"alpha 0 means alpha = rank ({rank}), i.e. no scaling (sd-scripts' rule)")


@preflight_check("network.weights")
def check_network_weights(ctx: CheckContext):
    s = ctx.settings
    value = s.network_weights.strip()
    if not value:
        if s.dim_from_weights:
            yield Problem("error", "dim_from_weights", "DIM from weights is ticked but no Network weights file is set",
                          fix="choose the LoRA file to continue from, or untick DIM from weights")
        return
    path = Path(value).expanduser()
    if not path.is_file():
        yield Problem("error", "network_weights", f"{path} does not exist or is not a file",
                      fix="choose an existing LoRA .safetensors file, or clear the field to start a new LoRA", file=value)
        return
    damaged = safetensors_problem(path) if path.suffix.lower() == ".safetensors" else None
    if damaged:
        yield Problem("error", "network_weights", f"{path.name} {damaged}", fix=WEIGHTS_FIX, file=value)
        return
    try:
        ranks = lora_ranks(path, ctx.deep)
    except ValueError as exc:
        yield Problem("error", "network_weights", str(exc), fix="choose a LoRA .safetensors file", file=value)
        return
    if ranks is None:
        return  # a .ckpt LoRA in a quick check: read before Start
    if not ranks:
        yield Problem("error", "network_weights", "the file holds no LoRA weights (no lora_down/lora_up keys)",
                      fix="choose a kohya-format LoRA file", file=value)
    elif not s.dim_from_weights and ranks != {s.network_dim}:
        found = ", ".join(str(r) for r in sorted(ranks))
        yield Problem("error", "network_dim", f"the Network weights file has rank {found} but Network Rank is {s.network_dim}",
                      fix="tick DIM from weights, or set Network Rank to the file's rank", file=value)


def lora_ranks(path: Path, deep: bool) -> set[int] | None:
    """The ranks of the lora_down weights in a LoRA file; None when not read (pickle, quick check).

    Raises ValueError for a file that cannot be read or that needs code to load.
    """
    if path.suffix.lower() == ".safetensors":
        try:
            shapes = read_safetensors_header(path).shapes
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path.name} is not a readable .safetensors file: {exc}") from exc
    elif not deep:
        return None
    else:
        shapes = _pickle_shapes(path)
    return {shape[0] for key, shape in shapes.items() if key.endswith("lora_down.weight") and shape}


def _pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from trainer.checkpoints.errors import CheckpointError
    from trainer.checkpoints.reader import TensorSource

    try:
        with TensorSource(path) as source:
            return source.shapes()
    except CheckpointError as exc:  # includes UnsafeCheckpointError: nothing was executed
        raise ValueError(str(exc)) from exc


@preflight_check("network.resume_files")
def check_resume_files(ctx: CheckContext):
    """Every weights file of the state folder to resume from is whole and loads weights-only (pickles: deep only)."""
    value = ctx.settings.resume.strip()
    folder = Path(value).expanduser()
    if not value or not folder.is_dir():
        return  # output.resume reports a missing folder
    for file in sorted(folder.iterdir()):
        problem = weights_file_problem(file, deep=ctx.deep) if file.is_file() else None
        if problem:
            yield Problem("error", "resume", f"{file.name} in the state folder {problem}",
                          fix="resume from another state folder (an earlier one, or the LoRA file as Network weights)",
                          file=str(file))
