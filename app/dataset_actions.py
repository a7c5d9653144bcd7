"""Dataset Preparation as the tab calls it: kohya's folder builder, Copy info to the Folders tab,
and regularisation images counted and generated. Widget values in, page text out; plain Python.

The work is ``trainer.dataset_prep`` (folders, counts) and ``trainer.inference``
(``generate_reg_images``); refusals come back as a status line, not an exception.
"""
from __future__ import annotations

from pathlib import Path

from .tab_common import (USER_ERRORS, ImageModels, done, model_flags, number, problem, progress_reporter, report_html,
                         text)

FOLDER_KEYS = ("train_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def prepare(values: dict, caption_extension: str, dry_run: bool = False) -> tuple[str, str, dict]:
    """(status, report, Folders tab values) of kohya's "Prepare training data"; the values are {} when refused.

    ``values``: instance_prompt, class_prompt, images_dir, repeats, reg_images_dir, reg_repeats, destination, merge.
    """
    from trainer.dataset_prep import prepare_training_folders

    try:
        result = prepare_training_folders(
            text(values["images_dir"]), text(values["destination"]), text(values["instance_prompt"]),
            text(values["class_prompt"]), number(values["repeats"], "Repeats"), text(values["reg_images_dir"]) or None,
            number(values["reg_repeats"], "Regularisation repeats"), caption_extension or "",
            merge=bool(values.get("merge")), dry_run=dry_run)
    except USER_ERRORS as err:
        return problem(f"Not prepared: {err}"), "", {}
    head = "Dry run: nothing was written." if dry_run else f"Prepared {result.destination}."
    if not dry_run:
        head += " Press “Copy info to Folders tab” to train on it."
    return done(head), report_html(result.summary), dict(result.settings)


def copy_info(destination: str) -> tuple[str, dict]:
    """(status, Folders tab values by kohya key) of a prepared destination.

    As kohya's "Copy info to respective fields"."""
    from trainer.dataset_prep import folder_settings

    if not text(destination):
        return problem("Type the destination training directory first."), {}
    settings = folder_settings(text(destination))
    warnings = [] if Path(settings["train_data_dir"]).is_dir() else [
        f"{settings['train_data_dir']} does not exist yet: press Prepare training data first."]
    shown = ", ".join(f"{key} = {settings[key] or '(none)'}" for key in FOLDER_KEYS)
    return done(f"Folders tab filled: {shown}.", warnings), settings


def reg_folder_for(destination: str, class_prompt: str, reg_repeats) -> str:
    """Where regularisation images for a prepared destination go: ``<dest>/reg/<repeats>_<class>``."""
    from trainer.dataset_prep import reg_folder_name
    from trainer.dataset_prep.layout import REG

    if not text(destination) or not text(class_prompt):
        return ""
    repeats = int(reg_repeats) if reg_repeats not in (None, "") and int(reg_repeats) > 0 else 1
    return str(Path(text(destination)).absolute() / REG / reg_folder_name(repeats, text(class_prompt)))


def count_reg(folder: str, total) -> str:
    """Existing against requested regularisation images, and where the missing ones would go."""
    from trainer.dataset_prep import count_reg_images

    try:
        return done(count_reg_images(text(folder), number(total, "Total number of images")).summary)
    except USER_ERRORS as err:
        return problem(str(err))


def generate_reg(models: ImageModels, base_model: str, values: dict, flags: dict, progress=None) -> str:
    """Generate the missing regularisation images with the Source Model; returns the status.

    ``values``: folder, class_prompt, negative_prompt, total, width, height, steps, sampler.
    ``flags``: clip_skip and v_parameterization from the settings form.
    """
    from trainer.dataset_prep import count_reg_images
    from trainer.inference.reg_images import FORM, generate_reg_images

    if not text(base_model):
        return problem("Choose the base model in the Source Model tab first: it draws the regularisation images.")
    try:
        count = count_reg_images(text(values["folder"]), number(values["total"], "Total number of images"))
        if not count.missing:
            return done(count.summary)
        if count.target_folder is None:
            return problem(count.summary)
        in_target = count.per_folder.get("." if count.target_folder == count.folder else count.target_folder.name, 0)
        models.stop_requested.clear()
        with models.notes() as notes:
            made = generate_reg_images(
                text(base_model), count.target_folder, text(values["class_prompt"]), in_target + count.missing,
                (number(values["width"], "Width"), number(values["height"], "Height")),
                negative_prompt=text(values.get("negative_prompt")), steps=number(values["steps"], "Steps"),
                sampler=values.get("sampler") or FORM.sampler, **model_flags(flags), tryit=models.tryit,
                progress=progress_reporter(progress, "images"), should_stop=models.stop_requested.is_set)
        after = count_reg_images(count.folder, count.requested)
    except USER_ERRORS as err:
        return problem(f"Not generated: {err}")
    stopped = " (stopped on request)" if after.missing and models.stop_requested.is_set() else ""
    return done(f"Made {len(made)} image(s) in {count.target_folder}{stopped}. {after.summary}", notes)
