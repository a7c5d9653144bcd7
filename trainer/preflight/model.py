"""Model checks: the base model path, its family against the v2 / v_parameterization / SDXL
settings, and the separate VAE. Detection is ``trainer.checkpoints.detect``'s.

Nothing is executed and no weights are loaded: a ``.safetensors`` header is read
as JSON here (so the CLI check does not import torch), a diffusers folder by its
JSON configs, and a ``.ckpt`` through the checkpoint reader, which uses only
``torch.load(weights_only=True)``: a pickle that needs more is refused, unrun.
Results are cached by (path, modification time, size), so the GUI's check on
every edit does not re-read an unchanged multi-GB file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainer.families import spec_for_checkpoint, spec_for_settings
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem
from trainer.problems import NekoyaError

WEIGHTS_FIX = "copy or download the model again (a .safetensors version is safest)"
SAFETENSORS_FIX = "use a .safetensors version of the model (most models are published as .safetensors)"


@dataclass(frozen=True)
class ModelFacts:
    """What preflight learnt about the base model."""

    path: Path
    info: object  # trainer.checkpoints.detect.ModelInfo

    @property
    def family(self) -> str | None:
        return self.info.family


class ModelPathProblem(NekoyaError):
    """A model path that cannot be inspected; carries the message and the fix."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message, self.fix = message, fix


_detections: dict[tuple[str, int, int], object] = {}


def weights_problems(path: Path, deep: bool) -> list[tuple[Path, str]]:
    """(file, problem) for each truncated or unloadable weights file of a model file or diffusers folder;
    pickles are opened only in a ``deep`` check."""
    from trainer.checkpoints.integrity import weights_file_problem
    from trainer.checkpoints.weight_files import UnreadableIndex, pipeline_weight_files

    try:
        files = pipeline_weight_files(path) if path.is_dir() else [path]
    except UnreadableIndex as exc:
        return [(exc.index, exc.problem)]
    found = [(file, weights_file_problem(file, deep=deep)) for file in files]
    return [(file, problem) for file, problem in found if problem]


def detect_model(path: Path):
    """helper-1's ``ModelInfo`` for ``path``, cached by (path, mtime, size). Raises ModelPathProblem."""
    from trainer.checkpoints.detect import detect, detect_from_keys
    from trainer.checkpoints.errors import CheckpointError, UnsafeCheckpointError
    from trainer.checkpoints.integrity import read_safetensors_header

    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelPathProblem(f"cannot read {path}: {exc.strerror or exc}") from exc
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _detections:
        return _detections[key]
    try:
        if path.is_file() and path.suffix.lower() == ".safetensors":
            header = read_safetensors_header(path)
            info = detect_from_keys(path, "safetensors", header.shapes, dict(header.metadata))
        else:
            info = detect(path)
    except UnsafeCheckpointError as exc:
        raise ModelPathProblem(str(exc), SAFETENSORS_FIX) from exc
    except (CheckpointError, ValueError, KeyError, TypeError) as exc:
        raise ModelPathProblem(f"{path.name} is not a readable Stable Diffusion model: {exc}",
                               "check that the file is complete (re-download it) and is a .safetensors/.ckpt checkpoint "
                               "or a diffusers folder") from exc
    except OSError as exc:
        raise ModelPathProblem(f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions") from exc
    _detections[key] = info
    return info


def hub_cache_folder(name: str) -> Path | None:
    """A hub id ("org/model") already in the local Hugging Face cache, as its snapshot folder."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = hub / ("models--" + name.replace("/", "--")) / "snapshots"
    found = sorted(snapshots.glob("*/model_index.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def resolve_model_path(value: str) -> Path:
    """The local file or folder a model setting points at. Raises ModelPathProblem."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    cached = hub_cache_folder(value)
    if cached is not None:
        return cached
    if value.count("/") == 1 and not value.startswith((".", "/", "~")):
        raise ModelPathProblem(
            f"'{value}' is neither a local file or folder nor in the local Hugging Face cache; Nekoya never downloads",
            "give the path of a .safetensors checkpoint or a diffusers folder on this computer",
        )
    raise ModelPathProblem(f"{path} does not exist", "check the path; copy it from your file manager")


def inspect_base_model(ctx: CheckContext) -> ModelFacts | None:
    """ModelFacts for the base model, or None (the path check reports why)."""
    value = ctx.settings.pretrained_model_name_or_path.strip()
    if not value:
        return None
    try:
        path = resolve_model_path(value)
        return ModelFacts(path, detect_model(path))
    except ModelPathProblem:
        return None


@preflight_check("model.path")
def check_model_path(ctx: CheckContext):
    key = "pretrained_model_name_or_path"
    value = ctx.settings.pretrained_model_name_or_path.strip()
    if not value:
        yield Problem("error", key, "no base model is set", fix="choose a Stable Diffusion .safetensors file or diffusers folder")
        return
    try:
        path = resolve_model_path(value)
        info = detect_model(path)
    except ModelPathProblem as problem:
        yield Problem("error", key, problem.message, fix=problem.fix, file=value)
        return
    damaged = weights_problems(path, ctx.deep) if info.format != "ckpt" else []  # detect() loaded a .ckpt already
    for file, problem in damaged:
        yield Problem("error", key, f"{file.name} {problem}", fix=WEIGHTS_FIX, file=str(file))
    if damaged:
        return
    for reason in info.problems:
        yield Problem("error", key, reason, fix="choose a Stable Diffusion 1.x, 2.x or XL base checkpoint", file=str(path))
    if not info.problems and info.family is None:
        yield Problem("error", key, "not a Stable Diffusion 1.x, 2.x or XL model", file=str(path))
    if info.format == "ckpt":
        yield Problem("note", key, "a .ckpt (pickle) model is read with torch's safe loader only",
                      fix="prefer .safetensors: it loads faster and cannot contain code", file=str(path))


@preflight_check("model.family")
def check_model_family(ctx: CheckContext):
    facts = ctx.model
    if facts is None or facts.family is None:
        return
    s = ctx.settings
    detected, chosen = spec_for_checkpoint(facts.family), spec_for_settings(s)
    name = detected.label
    if detected.layout != chosen.layout:
        wrong = {k: v for k, v in detected.flags.items() if bool(getattr(s, k)) != v}
        ticks = " and ".join(("tick " if v else "untick ") + k for k, v in wrong.items())
        for key in wrong:
            yield Problem(
                "error", key,
                f"the model is {name} (from its weights) but the settings say {chosen.label}",
                fix=f"{ticks} (or choose a {chosen.label} model)", file=str(facts.path),
            )
    v_param = facts.info.v_parameterization
    if v_param is not None and v_param != bool(s.v_parameterization):
        kind = "a v-prediction model" if v_param else "an epsilon (noise-prediction) model"
        # A diffusers folder's scheduler says it for sure; a single file only by metadata or convention.
        certain = facts.info.format == "diffusers"
        yield Problem(
            "error" if certain else "warning", "v_parameterization",
            f"the model is {kind} (from its {'scheduler config' if certain else 'metadata or family'})",
            fix=("tick" if v_param else "untick") + " v_parameterization", file=str(facts.path),
        )
    elif v_param is None:  # detection says nothing only where a family's single files do not tell
        yield Problem(
            "note", "v_parameterization",
            f"an {detected.short_label} single file does not say whether it is v-prediction; v_parameterization is "
            f"{'ticked' if s.v_parameterization else 'unticked'}",
            fix="tick it for 768 px 'v' models (e.g. v2-1_768), untick it for 512 px 'base' models",
            file=str(facts.path),
        )


@preflight_check("model.vae")
def check_vae(ctx: CheckContext):
    value = ctx.settings.vae.strip()
    if not value:
        return
    path = Path(value).expanduser()
    if not path.exists():
        yield Problem("error", "vae", f"{path} does not exist", fix="clear the VAE field to use the model's own VAE", file=value)
        return
    if path.is_dir() and (path / "config.json").is_file():  # a diffusers AutoencoderKL folder
        return
    try:
        info = detect_model(path)
    except ModelPathProblem as problem:
        yield Problem("error", "vae", problem.message, fix=problem.fix, file=value)
        return
    if info.kind not in ("vae", "checkpoint"):
        yield Problem("error", "vae", f"not a VAE: {'; '.join(info.problems)}", file=value)
