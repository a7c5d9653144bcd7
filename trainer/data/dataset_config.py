"""sd-scripts' dataset config file (kohya_ss's ``dataset_config``): datasets and subsets from a TOML file.

The file (TOML, or JSON as sd-scripts also reads) has ``[general]`` defaults, ``[[datasets]]`` and in each
``[[datasets.subsets]]``. As sd-scripts' ``library/config_util.py`` does:

* a subset's value comes from the subset, else its dataset, else ``[general]``, else the training settings
  (sd-scripts' command-line arguments: ``train_batch_size`` is ``batch_size``, ``max_resolution`` is
  ``resolution``, ``shuffle_caption``, ``keep_tokens``, ``flip_aug``... ), else sd-scripts' default;
  a dataset's values (resolution, batch size, buckets) come from the dataset, ``[general]``, the settings;
* ``train_data_dir`` and ``reg_data_dir`` are ignored when a dataset config is given;
* a key sd-scripts does not know is refused, and so is a subset with ``metadata_file`` (fine-tuning style)
  or, without ``masked_loss``, ``conditioning_data_dir`` (ControlNet): Nekoya trains DreamBooth-style subsets
  (``image_dir`` with caption files, ``class_tokens`` for images without one); with ``masked_loss`` a subset's
  ``conditioning_data_dir`` is its folder of loss masks (as sd-scripts reads it then: the image of the same
  name, its red channel);
* each dataset keeps its own buckets and batch size, and balances its regularisation subsets against its
  own training subsets; an epoch is every dataset's batches, drawn in a shuffled order.

Torch-free: the GUI's live step plan reads it. Every error names the file, the table and the key.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trainer.data.buckets import BucketConfigError, BucketSettings, Size, resolution_of
from trainer.data.captions import CaptionConfig
from trainer.problems import NekoyaError

FIELD = "dataset_config"
MAX_FILE_BYTES = 1 << 20


class DatasetConfigError(NekoyaError, ValueError):
    """The dataset config file cannot be used: the message names the file, the table and the key."""

    def __init__(self, message: str, *, file: str | None = None, fix: str = "") -> None:
        super().__init__(message)
        self.field, self.file, self.fix = FIELD, file, fix


@dataclass(frozen=True)
class SubsetSpec:
    """One ``[[datasets.subsets]]`` with every value resolved (subset, dataset, general, settings, default)."""

    table: str  # "datasets[0].subsets[1]", as the file nests it (0-based, like sd-scripts' log)
    dataset_index: int
    index: int
    image_dir: Path
    num_repeats: int
    is_reg: bool
    class_tokens: str | None  # the caption of images without a caption file
    caption_extension: str
    captions: CaptionConfig
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    resolution: Size  # its dataset's
    batch_size: int  # its dataset's: a batch holds images of one dataset only
    conditioning_data_dir: Path | None = None  # with masked_loss: the loss masks, one per image by file name

    @property
    def label(self) -> str:
        return f"{'reg ' if self.is_reg else ''}subset {self.index + 1} of dataset {self.dataset_index + 1}"


@dataclass(frozen=True)
class DatasetSpec:
    table: str  # "datasets[0]"
    index: int
    resolution: Size
    batch_size: int
    buckets: BucketSettings
    subsets: tuple[SubsetSpec, ...]


@dataclass(frozen=True)
class DatasetToml:
    path: Path
    datasets: tuple[DatasetSpec, ...]
    not_applied: tuple[str, ...] = ()  # keys sd-scripts knows that Nekoya does not apply, with where they are set
    ignored: tuple[str, ...] = ()  # subsets left out as sd-scripts leaves them out (num_repeats < 1, a repeated folder)

    @property
    def subsets(self) -> list[SubsetSpec]:
        return [subset for dataset in self.datasets for subset in dataset.subsets]


# ---- the schema (sd-scripts' ConfigSanitizer, DreamBooth style with caption dropout) -----------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_resolution(v: Any) -> bool:
    return (_is_int(v) and v > 0) or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v))


def _is_pair_of_numbers(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v)


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (_is_int, "a whole number"),
    "number": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a quoted string"),
    "resolution": (_is_resolution, "a number or [width, height]"),
    "pair": (_is_pair_of_numbers, "[low, high]"),
    "list": (lambda v: isinstance(v, list), "a list of [[datasets.subsets]] tables"),
}

# subset keys that may also be given on a dataset or in [general] ("ascendable" in sd-scripts)
SUBSET_DEFAULTS = {
    "num_repeats": "int", "shuffle_caption": "bool", "keep_tokens": "int", "flip_aug": "bool", "color_aug": "bool",
    "random_crop": "bool", "caption_extension": "str", "class_tokens": "str", "caption_dropout_rate": "number",
    "caption_dropout_every_n_epochs": "int", "caption_tag_dropout_rate": "number", "caption_prefix": "str",
    "caption_suffix": "str",
    # sd-scripts knows these; Nekoya does not apply them (a warning names each one set)
    "keep_tokens_separator": "str", "secondary_separator": "str", "enable_wildcard": "bool",
    "face_crop_aug_range": "pair", "token_warmup_min": "int", "token_warmup_step": "number", "cache_info": "bool",
}
SUBSET_ONLY = {"image_dir": "str", "is_reg": "bool"}
DATASET_KEYS = {
    "resolution": "resolution", "batch_size": "int", "enable_bucket": "bool", "min_bucket_reso": "int",
    "max_bucket_reso": "int", "bucket_reso_steps": "int", "bucket_no_upscale": "bool", "network_multiplier": "number",
}
# known to sd-scripts, not applied here, with the value at which that loses nothing
NOT_APPLIED = {
    "keep_tokens_separator": "", "secondary_separator": "", "enable_wildcard": False, "face_crop_aug_range": None,
    "token_warmup_min": 1, "token_warmup_step": 0, "cache_info": False,
    "network_multiplier": 1.0,
}
REFUSED_STYLES = {
    "metadata_file": "a fine-tuning style subset (captions from a metadata JSON file) is not supported: Nekoya trains "
                     "DreamBooth-style subsets",
    "conditioning_data_dir": "a ControlNet subset is not supported: Nekoya trains LoRAs for text-to-image models "
                             "(with masked_loss on, it is read as the subset's folder of loss masks)",
}
MASK_FOLDER = {"conditioning_data_dir": "str"}  # a subset key with masked_loss (sd-scripts' support_controlnet)
REFUSED_FIX = "give the subset an image_dir with caption files next to the images (and class_tokens for images " \
              "without one), as in a DreamBooth-style subset"

# the training settings each key falls back to (sd-scripts' command-line arguments)
_SETTING_OF = {
    "batch_size": "train_batch_size", "enable_bucket": "enable_bucket", "min_bucket_reso": "min_bucket_reso",
    "max_bucket_reso": "max_bucket_reso", "bucket_reso_steps": "bucket_reso_steps",
    "bucket_no_upscale": "bucket_no_upscale", "shuffle_caption": "shuffle_caption", "keep_tokens": "keep_tokens",
    "flip_aug": "flip_aug", "color_aug": "color_aug", "random_crop": "random_crop",
    "caption_extension": "caption_extension", "caption_dropout_rate": "caption_dropout_rate",
    "caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "caption_tag_dropout_rate",
}
# sd-scripts' defaults where neither the file nor a setting gives a value
_DEFAULTS = {
    "num_repeats": 1, "is_reg": False, "class_tokens": None, "batch_size": 1, "enable_bucket": False,
    "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False,
    "shuffle_caption": False, "keep_tokens": 0, "flip_aug": False, "color_aug": False, "random_crop": False,
    "caption_extension": ".caption", "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0, "caption_prefix": None, "caption_suffix": None,
}


def dataset_config_path(settings: Any) -> str:
    """The dataset config file the settings name ("" when none): kohya_ss writes "" (or false/null) for none."""
    value = getattr(settings, FIELD, None)
    if value is None or isinstance(value, bool):
        return ""
    return str(value).strip()


def load_dataset_config(settings: Any, path: str | os.PathLike | None = None) -> DatasetToml:
    """Read and resolve the dataset config the settings name (or ``path``). Raises DatasetConfigError."""
    text_path = str(path) if path is not None else dataset_config_path(settings)
    file = Path(text_path).expanduser()
    raw = _read(file, text_path)
    return _resolve(raw, file, settings)


def _read(file: Path, shown: str) -> dict:
    where = f"{FIELD} {shown}"
    if not file.exists():
        relative = "" if file.is_absolute() else f" (a relative path is read from the current folder {Path.cwd()}, " \
                                                   "as sd-scripts reads it)"
        raise DatasetConfigError(f"{where} does not exist{relative}", file=shown,
                                 fix="choose the dataset config file (.toml), or clear dataset_config to train from "
                                     "the Image folder")
    if not file.is_file():
        raise DatasetConfigError(f"{where} is not a file", file=shown, fix="choose the dataset config .toml file")
    if file.stat().st_size > MAX_FILE_BYTES:
        raise DatasetConfigError(f"{where} is larger than 1 MiB: not a dataset config", file=shown)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise DatasetConfigError(f"{where} is not a .toml or .json file (sd-scripts reads only those)", file=shown)
    try:
        text = file.read_text(encoding="utf-8")
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetConfigError(f"{where} cannot be read as {suffix[1:].upper()}: {exc}", file=shown,
                                 fix="fix the syntax at the place named") from exc
    if not isinstance(data, dict):
        raise DatasetConfigError(f"{where} holds no tables", file=shown)
    return data


class _Where:
    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, table: str, key: str | None, message: str, fix: str = "") -> DatasetConfigError:
        place = f"[{table}]" + (f" {key}" if key else "")
        return DatasetConfigError(f"{FIELD} {self.file}: {place}: {message}", file=str(self.file), fix=fix)


def _check_table(where: _Where, table: str, values: Any, allowed: dict[str, str]) -> dict:
    if not isinstance(values, dict):
        raise where.error(table, None, "must be a table")
    for key, value in values.items():
        if key in REFUSED_STYLES and key not in allowed:
            raise where.error(table, key, REFUSED_STYLES[key], REFUSED_FIX)
        if key not in allowed:
            raise where.error(table, key, "is not a key sd-scripts knows here (sd-scripts refuses it too)",
                              fix="remove it or correct its name; " + _known(allowed))
        check, expected = _TYPES[allowed[key]]
        if not check(value):
            raise where.error(table, key, f"must be {expected}, not {json.dumps(value, default=str)}")
    return values


def _known(allowed: dict[str, str]) -> str:
    return "keys here: " + ", ".join(sorted(allowed))


def _resolve(raw: dict, file: Path, settings: Any) -> DatasetToml:
    where = _Where(file)
    for key in raw:
        if key not in ("general", "datasets"):
            raise where.error(key, None, "is not a table sd-scripts knows: a dataset config has [general] and "
                                         "[[datasets]] with [[datasets.subsets]]")
    general = _check_table(where, "general", raw.get("general", {}), {**DATASET_KEYS, **SUBSET_DEFAULTS})
    datasets_raw = raw.get("datasets", [])
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise where.error("datasets", None, "the file has no [[datasets]]; each needs at least one "
                                            "[[datasets.subsets]] with an image_dir",
                          fix="add [[datasets]] and [[datasets.subsets]] tables")
    not_applied: list[str] = []
    ignored: list[str] = []
    datasets = []
    for d, dataset_raw in enumerate(datasets_raw):
        table = f"datasets[{d}]"
        dataset_values = _check_table(where, table, dataset_raw, {**DATASET_KEYS, **SUBSET_DEFAULTS, "subsets": "list"})
        subsets_raw = dataset_values.get("subsets", [])
        if not isinstance(subsets_raw, list) or not subsets_raw:
            raise where.error(table, "subsets", "the dataset has no [[datasets.subsets]]",
                              fix="add a [[datasets.subsets]] with image_dir and num_repeats")
        chain = [dataset_values, general]
        value = _lookup(chain, settings)
        resolution = _resolution(where, table, chain, settings)
        batch_size = value("batch_size")
        if batch_size < 1:
            raise where.error(_source(chain, "batch_size", table) or table, "batch_size", f"must be at least 1, not {batch_size}")
        buckets = BucketSettings(resolution=resolution, enable_bucket=value("enable_bucket"),
                                 min_reso=value("min_bucket_reso"), max_reso=value("max_bucket_reso"),
                                 reso_steps=value("bucket_reso_steps"), no_upscale=value("bucket_no_upscale"))
        subsets = []
        for s, subset_raw in enumerate(subsets_raw):
            sub_table = f"{table}.subsets[{s}]"
            masks = MASK_FOLDER if getattr(settings, "masked_loss", False) else {}
            subset_values = _check_table(where, sub_table, subset_raw, {**SUBSET_DEFAULTS, **SUBSET_ONLY, **masks})
            if "image_dir" not in subset_values:
                raise where.error(sub_table, "image_dir", "is missing: a DreamBooth-style subset needs the folder of "
                                                          "its images", fix="add image_dir = \"path/to/images\"")
            subset = _subset(where, sub_table, d, s, [subset_values, *chain], settings, resolution, batch_size)
            if subset.num_repeats < 1:  # sd-scripts ignores the subset and says so
                ignored.append(f"dataset_config {file}: [{sub_table}] is ignored: num_repeats is {subset.num_repeats}, "
                               "less than 1 (as sd-scripts ignores it)")
                continue
            first = next((kept for kept in subsets if kept.image_dir == subset.image_dir), None)
            if first is not None:  # sd-scripts keeps the first subset of a folder in a dataset
                ignored.append(f"dataset_config {file}: [{sub_table}] is ignored: [{first.table}] already has "
                               f"image_dir {subset.image_dir} (sd-scripts uses the first one too)")
                continue
            subsets.append(subset)
        for key, off in NOT_APPLIED.items():
            for values, name in ((dataset_values, table), *((sv, f"{table}.subsets[{i}]") for i, sv in enumerate(subsets_raw))):
                if key in values and values[key] != off and values[key] not in ("", None):
                    not_applied.append(f"[{name}] {key} = {json.dumps(values[key])}")
        datasets.append(DatasetSpec(table, d, resolution, batch_size, buckets, tuple(subsets)))
    for key, off in NOT_APPLIED.items():
        if key in general and general[key] != off and general[key] not in ("", None):
            not_applied.insert(0, f"[general] {key} = {json.dumps(general[key])}")
    return DatasetToml(file, tuple(datasets), tuple(not_applied), tuple(ignored))


def _lookup(chain: list[dict], settings: Any) -> Callable[[str], Any]:
    """sd-scripts' search_value: the first table that gives the key (None counts as not given), else the
    setting it falls back to, else sd-scripts' default."""

    def value(key: str) -> Any:
        for table in chain:
            if table.get(key) is not None:
                return table[key]
        setting = _SETTING_OF.get(key)
        if setting is not None and getattr(settings, setting, None) is not None:
            return _setting_value(key, getattr(settings, setting))
        return _DEFAULTS.get(key)

    return value


def _setting_value(key: str, value: Any) -> Any:
    default = _DEFAULTS[key]
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value or 0)
    if isinstance(default, float):
        return float(value or 0.0)
    return value


def _source(chain: list[dict], key: str, *names: str) -> str | None:
    for table, name in zip(chain, (*names, "general")):
        if table.get(key) is not None:
            return name
    return None


def _resolution(where: _Where, table: str, chain: list[dict], settings: Any) -> Size:
    for values in chain:
        if values.get("resolution") is not None:
            value = values["resolution"]
            return (value, value) if isinstance(value, int) else (value[0], value[1])
    try:
        return resolution_of(settings)
    except BucketConfigError as exc:
        raise where.error(table, "resolution", f"is not set here or in [general], and max_resolution cannot be "
                                               f"read: {exc.message}", fix="add resolution = 512 to [general]") from exc


def _subset(where: _Where, table: str, d: int, s: int, chain: list[dict], settings: Any, resolution: Size,
            batch_size: int) -> SubsetSpec:
    value = _lookup(chain, settings)
    repeats = value("num_repeats")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= value(key) <= 1:
            raise where.error(table, key, f"must be between 0 and 1, not {value(key)}")
    for key in ("keep_tokens", "caption_dropout_every_n_epochs"):
        if value(key) < 0:
            raise where.error(table, key, f"must be 0 or more, not {value(key)}")
    image_dir = Path(str(chain[0]["image_dir"])).expanduser()
    mask_dir = chain[0].get("conditioning_data_dir")
    extension = str(value("caption_extension") or "")
    if extension and not extension.startswith("."):
        extension = "." + extension
    captions = CaptionConfig(
        shuffle=value("shuffle_caption"), keep_tokens=value("keep_tokens"),
        dropout_rate=float(value("caption_dropout_rate")),
        dropout_every_n_epochs=value("caption_dropout_every_n_epochs"),
        tag_dropout_rate=float(value("caption_tag_dropout_rate")),
        prefix=value("caption_prefix") or "", suffix=value("caption_suffix") or "",
    )
    return SubsetSpec(
        table=table, dataset_index=d, index=s, image_dir=image_dir, num_repeats=repeats,
        is_reg=bool(chain[0].get("is_reg", False)), class_tokens=value("class_tokens"), caption_extension=extension,
        captions=captions, flip_aug=value("flip_aug"), color_aug=value("color_aug"), random_crop=value("random_crop"),
        resolution=resolution, batch_size=batch_size,
        conditioning_data_dir=Path(str(mask_dir)).expanduser() if mask_dir else None,
    )


__all__ = ["DatasetConfigError", "DatasetSpec", "DatasetToml", "SubsetSpec", "dataset_config_path",
           "load_dataset_config", "FIELD"]
