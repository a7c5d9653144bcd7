"""Dataset checks: folder layout, unreadable or tiny images, captions, and the step plan.

The scan and the plan are helper-2's (``trainer.data.folders`` / ``trainer.data.plan``);
these checks turn what they found into problems that say what was found, what is
expected and what to change, naming the folder or file.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from trainer.data.buckets import BucketConfigError, Bucketer, BucketSettings
from trainer.data.dataset_config import FIELD as DATASET_CONFIG, DatasetConfigError, dataset_config_path, load_dataset_config
from trainer.data.folders import IMAGE_EXTENSIONS, is_image_file, parse_concept_folder_name, subset_dir_problem
from trainer.data.plan import dataset_bucket_error, not_applied_warning
from trainer.preflight.image_check import verify_images
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

MIN_IMAGE_SIDE = 64  # below this an image has no usable detail at any SD resolution
SMALL_AREA_FRACTION = 0.25  # images under a quarter of the training area get a warning
MAX_NAMED_FILES = 20  # per kind of problem; the rest are counted in one line
CAPTION_EXTENSIONS = (".txt", ".caption", ".cap")
_EXPECTED = "'<repeats>_<name>' sub-folders, e.g. '10_sks dog' (10 repeats, caption 'sks dog')"


# ---- folder layout -------------------------------------------------------------------------

def _layout_problems(key: str, value: str, scan, required: bool):
    kind = "Image folder" if key == "train_data_dir" else "Regularisation folder"
    if not value:
        if required:
            yield Problem("error", key, f"{kind} is not set", fix=f"choose the parent folder of your {_EXPECTED}")
        return
    root = Path(value).expanduser()
    if not root.exists():
        yield Problem("error", key, f"{root} does not exist", fix="check the path (copy it from your file manager)", file=value)
        return
    if not root.is_dir():
        yield Problem("error", key, f"{root} is a file, not a folder", fix=f"choose the folder that holds the {_EXPECTED}", file=value)
        return
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    folders = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and is_image_file(p)]
    if scan.concepts:
        yield from _ignored_parts(key, root, scan, loose)
        return
    yield _no_concepts_problem(key, kind, root, entries, folders, loose, scan)


def _no_concepts_problem(key, kind, root: Path, entries, folders, loose, scan) -> Problem:
    """Why no '<repeats>_<name>' folder with images was found, and what to do instead."""
    if not entries:
        return Problem("error", key, f"{root} is empty; expected {_EXPECTED} with images inside",
                       fix="put your images in a sub-folder such as '10_sks dog'", file=str(root))
    if loose and not folders:
        return Problem("error", key, f"{root} holds {_n(len(loose), 'image')} directly but no {_EXPECTED}; "
                       f"{kind} must be the parent of those folders", fix=_leaf_fix(root), file=str(root))
    concept_like = [f for f in folders if parse_concept_folder_name(f.name)]
    if concept_like:  # named right, but empty or with repeats < 1
        reasons = "; ".join(f"'{s.path.name}': {s.reason}" for s in scan.skipped if s.path.parent == root)
        return Problem("error", key, f"no usable images in the '<repeats>_<name>' folders of {root} ({reasons})",
                       fix=f"put images ({', '.join(IMAGE_EXTENSIONS)}) in them; repeats must be at least 1", file=str(root))
    nested = [f for f in folders if any(parse_concept_folder_name(g.name) for g in f.iterdir() if g.is_dir())]
    found = ", ".join(f"'{f.name}'" for f in folders[:5]) + (" ..." if len(folders) > 5 else "")
    fix = (f"set {kind} to {nested[0]}, which holds the '<repeats>_<name>' folders" if nested
           else f"rename them with a repeat count, e.g. '{folders[0].name}' -> '10_{folders[0].name}'")
    return Problem("error", key, f"found the sub-folder(s) {found} in {root}, but none is named like {_EXPECTED}",
                   fix=fix, file=str(root))


def _leaf_fix(root: Path) -> str:
    if parse_concept_folder_name(root.name):
        return f"set it to the parent folder {root.parent} (your folder '{root.name}' is already named <repeats>_<name>)"
    return f"move the images into a sub-folder such as {root / ('10_' + root.name)} and keep this folder selected"


def _ignored_parts(key: str, root: Path, scan, loose: list[Path]):
    if loose:
        yield Problem("warning", key, f"{_n(len(loose), 'image')} lie directly in {root} and are not used; "
                      f"only images inside {_EXPECTED} are", fix="move them into one of the '<repeats>_<name>' folders",
                      file=str(root))
    for skipped in scan.skipped:
        if skipped.path.parent == root and skipped.path.is_dir():
            yield Problem("warning", key, f"the folder '{skipped.path.name}' is ignored: {skipped.reason}",
                          fix="rename it to '<repeats>_<name>' if it should be trained", file=str(skipped.path))


@preflight_check("dataset.train_folder")
def check_train_folder(ctx: CheckContext):
    if dataset_config_path(ctx.settings):
        yield from _dataset_config_problems(ctx)
        return
    yield from _layout_problems("train_data_dir", ctx.settings.train_data_dir.strip(), ctx.train_scan, required=True)


@preflight_check("dataset.reg_folder")
def check_reg_folder(ctx: CheckContext):
    if ctx.reg_scan is not None and not dataset_config_path(ctx.settings):
        yield from _layout_problems("reg_data_dir", ctx.settings.reg_data_dir.strip(), ctx.reg_scan, required=False)


# ---- a dataset config file (sd-scripts' dataset_config TOML) -------------------------------------------------

def _dataset_config_problems(ctx: CheckContext):
    """The file, its subsets' folders, the folder settings it replaces and the keys Nekoya does not apply."""
    s = ctx.settings
    try:
        toml = load_dataset_config(s)
    except DatasetConfigError as exc:
        yield Problem("error", DATASET_CONFIG, str(exc), fix=exc.fix, file=exc.file)
        return
    for key in ("train_data_dir", "reg_data_dir"):
        if str(getattr(s, key, "") or "").strip():
            yield Problem("warning", key, f"{key} is not used: the images come from the subsets of dataset_config "
                          f"{toml.path}, as sd-scripts ignores {key} when a dataset config is given",
                          fix=f"clear {key}, or clear dataset_config to train from {key}")
    missing = False
    for subset in toml.subsets:
        problem = subset_dir_problem(toml, subset)
        if problem:
            missing = True
            yield Problem("error", DATASET_CONFIG, problem, fix=f"correct image_dir in [{subset.table}]",
                          file=str(subset.image_dir))
    for scan in (ctx.train_scan, ctx.reg_scan):
        for warning in (scan.warnings if scan else ()):
            if warning.startswith("dataset_config "):  # a subset without images
                yield Problem("warning", DATASET_CONFIG, warning, fix="put images in it, or remove the subset",
                              file=str(toml.path))
    if not missing:
        for problem in ctx.train_scan.problems:
            yield Problem("error", DATASET_CONFIG, problem, fix="add a [[datasets.subsets]] with training images "
                          "(is_reg = false)", file=str(toml.path))
    for ignored in toml.ignored:
        yield Problem("warning", DATASET_CONFIG, ignored, fix="remove that subset, or correct it", file=str(toml.path))
    if toml.not_applied:
        yield Problem("warning", DATASET_CONFIG, not_applied_warning(toml),
                      fix="remove those keys to silence this warning", file=str(toml.path))
    yield from _latent_cache_conflicts(s, toml)


def _latent_cache_conflicts(s, toml):
    """Subsets whose augmentations cached latents cannot follow (the run caches latents for the settings)."""
    caching = (s.cache_latents or s.cache_latents_to_disk) and not (s.color_aug or s.random_crop)
    if not caching:
        return
    for subset in toml.subsets:
        changing = [key for key in ("color_aug", "random_crop") if getattr(subset, key)]
        if changing:
            yield Problem("error", DATASET_CONFIG, f"dataset_config {toml.path}: [{subset.table}] "
                          f"{' and '.join(changing)} = true changes the pixels every time an image is used, so its "
                          "latents cannot be cached (sd-scripts refuses this too)",
                          fix=f"untick Cache latents, or set {' and '.join(changing)} = false in [{subset.table}]",
                          file=str(toml.path))
        elif subset.flip_aug and not s.flip_aug:
            yield Problem("error", DATASET_CONFIG, f"dataset_config {toml.path}: [{subset.table}] flip_aug = true "
                          "with cached latents: Nekoya caches mirrored latents only when the flip_aug setting is on",
                          fix="tick flip_aug in the settings (and set flip_aug = false in the subsets that should not "
                              "flip), or untick Cache latents", file=str(toml.path))


# ---- images --------------------------------------------------------------------------------

def _scans(ctx: CheckContext):
    """(field to blame, scan): the folder settings, or dataset_config for the subsets of a dataset config."""
    if dataset_config_path(ctx.settings):
        return [(DATASET_CONFIG, scan) for scan in (ctx.train_scan, ctx.reg_scan) if scan]
    return [(key, scan) for key, scan in (("train_data_dir", ctx.train_scan), ("reg_data_dir", ctx.reg_scan)) if scan]


@preflight_check("dataset.unreadable_images")
def check_unreadable_images(ctx: CheckContext):
    stop = ctx.settings.bad_image_policy == "stop"
    severity = "error" if stop else "warning"
    outcome = "" if stop else "; it is left out (On unreadable image = skip)"
    fix = "delete or re-save the file" + ("" if not stop else ", or set On unreadable image to skip to leave it out")
    bad: list[tuple[str, Path, str]] = []
    for key, scan in _scans(ctx):
        bad += [(key, s.path, s.reason) for s in scan.skipped if s.path.is_file() and is_image_file(s.path)]
        verification = verify_images([item.path for item in scan.images], budget_s=ctx.image_budget_s)
        ctx.unverified_images += verification.unverified
        bad += [(key, path, reason) for path, reason in verification.bad.items()]
    yield from _named(bad, severity, lambda reason: f"{reason}{outcome}", fix)
    for key, scan in _scans(ctx):
        for s in scan.skipped:
            if s.path.is_file() and not is_image_file(s.path):  # a caption that is not UTF-8
                yield Problem("warning", key, f"{s.path.name}: {s.reason}; its image is left out",
                              fix="re-save the caption file as UTF-8", file=str(s.path))


def _bucket_config_error(settings) -> BucketConfigError | None:
    try:
        Bucketer(BucketSettings.from_settings(settings))
    except BucketConfigError as exc:
        return exc
    return None


def _dataset_bucket_errors(settings) -> list[str]:
    """Each dataset's bucket settings that cannot work together, for a dataset config file."""
    try:
        toml = load_dataset_config(settings)
    except DatasetConfigError:  # reported by dataset.train_folder
        return []
    return [error for error in (dataset_bucket_error(toml, dataset) for dataset in toml.datasets) if error]


@preflight_check("dataset.buckets")
def check_buckets(ctx: CheckContext):
    if dataset_config_path(ctx.settings):
        for error in _dataset_bucket_errors(ctx.settings):
            yield Problem("error", DATASET_CONFIG, error, fix="change that key in the dataset's table (or in [general])")
        return
    error = _bucket_config_error(ctx.settings)
    if error is not None:
        yield Problem("error", error.field, error.message, fix=error.fix)


@preflight_check("dataset.small_images")
def check_small_images(ctx: CheckContext):
    s = ctx.settings
    plan_skipped = {skip.path: skip for skip in ctx.plan.skipped} if ctx.plan else {}
    entries = {e.item.path: e for e in ctx.plan.entries} if ctx.plan else {}
    tiny, small, left_out = [], [], []
    for key, scan in _scans(ctx):
        for item in scan.images:
            size = f"{item.width}x{item.height} px"
            width, height = item.subset.resolution if item.subset is not None else s.resolution
            if item.path in plan_skipped:
                left_out.append((key, item.path, plan_skipped[item.path]))
            elif min(item.width, item.height) < MIN_IMAGE_SIDE:
                tiny.append((key, item.path, f"too small to train ({size}; at least {MIN_IMAGE_SIDE} px a side)"))
            elif item.width * item.height < SMALL_AREA_FRACTION * width * height and item.path in entries:
                small.append((key, item.path, f"small for {width}x{height} training ({size}); {_fate(entries[item.path], item)}"))
    yield from _named(tiny, "error", lambda reason: reason, "remove it or replace it with a larger version")
    yield from _named(small, "warning", lambda reason: reason, "use a larger version of the image, or remove it")
    for key, path, skip in left_out[:MAX_NAMED_FILES]:
        yield Problem("warning", key, f"{path.name}: left out: {skip.reason}", fix=skip.fix, file=str(path))
    if len(left_out) > MAX_NAMED_FILES:
        rest = left_out[MAX_NAMED_FILES:]
        yield Problem("warning", rest[0][0], f"and {_n(len(rest), 'more image')} left out like the ones above",
                      fix=rest[0][2].fix)


def _fate(entry, item) -> str:
    resized_w, resized_h = entry.choice.resized
    if resized_w > item.width:
        return f"it is enlarged {resized_w / item.width:.1f}x, which looks blurry"
    bucket_w, bucket_h = entry.choice.bucket
    return f"it trains at {bucket_w}x{bucket_h}"


def _named(found, severity, describe, fix):
    """One problem per file, up to MAX_NAMED_FILES, then one line counting the rest."""
    for key, path, reason in found[:MAX_NAMED_FILES]:
        yield Problem(severity, key, f"{path.name}: {describe(reason)}", fix=fix, file=str(path))
    if len(found) > MAX_NAMED_FILES:
        rest = found[MAX_NAMED_FILES:]
        yield Problem(severity, rest[0][0], f"and {_n(len(rest), 'more image')} like the ones above", fix=fix)


# ---- captions ------------------------------------------------------------------------------

@preflight_check("dataset.captions")
def check_captions(ctx: CheckContext):
    for key, scan in _scans(ctx):
        for concept in scan.concepts:
            subset = concept.subset
            extension = subset.caption_extension if subset is not None else ctx.settings.caption_extension or ""
            yield from _concept_captions(key, concept, extension)


def _concept_captions(key: str, concept, extension: str):
    images = len(concept.images)
    missing = images - concept.captions_found
    subset = concept.subset
    folder = concept.folder.name if subset is None else f"[{subset.table}] {concept.folder}"
    fallback = (f"the folder name '{concept.name}'" if subset is None else f"class_tokens '{concept.name}'") \
        if concept.name else "an empty caption"
    if missing and not concept.captions_found:
        others = _other_caption_files(concept.folder, extension)
        if others:
            found_ext, count = others
            field, fix = ("caption_extension", f"set Caption file extension to '{found_ext}'") if subset is None else \
                (DATASET_CONFIG, f"set caption_extension = \"{found_ext}\" in [{subset.table}] (or in [general])")
            yield Problem("warning", field,
                          f"{folder}: no '{extension}' caption files, but {_n(count, f'{found_ext} file')}; "
                          f"all {images} images will be captioned with {fallback}",
                          fix=fix, file=str(concept.folder))
        else:
            severity = "warning" if not concept.name else "note"
            if subset is not None and not concept.name:
                yield Problem(severity, key, f"{folder}: no caption files ({extension or 'none set'}) and no "
                              f"class_tokens; all {images} images train with an empty caption",
                              fix=f"add caption files, or class_tokens = \"...\" in [{subset.table}]",
                              file=str(concept.folder))
                return
            yield Problem(severity, key, f"{folder}: no caption files ({extension or 'none set'}); "
                          f"all {images} images are captioned with {fallback}", file=str(concept.folder))
    elif missing:
        yield Problem("warning", key, f"{folder}: {missing} of {images} images have no {extension} caption file; "
                      f"they are captioned with {fallback}", fix=f"add a {extension} file next to each image",
                      file=str(concept.folder))
    empty = [item.path for item in concept.images if item.caption_from_file and not item.caption]
    if empty:
        names = ", ".join(p.name for p in empty[:5]) + (" ..." if len(empty) > 5 else "")
        verb = "is" if len(empty) == 1 else "are"
        yield Problem("warning", key, f"{folder}: {_n(len(empty), 'caption file')} {verb} empty ({names}); "
                      "those images train with an empty caption", fix="write a caption in each, or delete the empty files "
                      f"to use {fallback}", file=str(concept.folder))


def _other_caption_files(folder: Path, extension: str) -> tuple[str, int] | None:
    counts = Counter(p.suffix.lower() for p in folder.iterdir() if p.suffix.lower() in CAPTION_EXTENSIONS)
    counts.pop(extension.lower(), None)
    return counts.most_common(1)[0] if counts else None


# ---- step plan -----------------------------------------------------------------------------

@preflight_check("dataset.plan")
def check_plan(ctx: CheckContext):
    """The plan's own findings, minus what the checks above already report in detail."""
    plan = ctx.plan
    if plan is None:
        if ctx.plan_error is not None:
            yield Problem("error", None, f"the step plan could not be computed: {ctx.plan_error}")
        return
    bucket_error = _bucket_config_error(ctx.settings)
    # What is left names no setting: a bucket setting's error is the dataset.buckets check's, with its field.
    covered = {str(bucket_error)} if bucket_error else set()
    if dataset_config_path(ctx.settings):  # the dataset config checks above name the file, table and key
        covered = set(_dataset_bucket_errors(ctx.settings))
        covered |= {w for w in plan.warnings if w.startswith("dataset_config ")}
    for _, scan in _scans(ctx):
        covered |= set(scan.problems) | set(scan.warnings)
    layout_failed = not ctx.train_scan.concepts
    for error in plan.errors:
        if error in covered or (layout_failed and "0 steps" in error):
            continue
        yield Problem("error", None, error)
    for warning in plan.warnings:
        if warning in covered or "skipped:" in warning or "are enlarged" in warning:
            continue  # named file by file above
        yield Problem("warning", None, warning)


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
