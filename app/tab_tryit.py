"""The Try it tab: a base model plus a trained LoRA at a weight, prompt in, images out; and two
LoRA files (or one at two weights) side by side with the same seed.

Generation is ``trainer.inference.TryIt`` (one model cached for the GUI process, see
``ImageModels``). Handlers run in Gradio's queue, one at a time, with step progress.
While a training run holds the device (``trainer.device_lease``) generation is refused with a
message saying so: a second model beside the run's would run out of memory or slow both to a crawl.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import gradio as gr

from trainer.inference.requests import TryItRequest
from trainer.settings.field import request_infos

from .tab_common import (LORA_LIST_INFO, MODEL_FILE_INPUTS, REFRESH_LABEL, USER_ERRORS, ImageModels, NamedFields,
                         done, follow, lora_files, model_flags, number, problem, progress_reporter, saved_lora_paths,
                         status_box, text)
from .widgets import build_component, build_options

TAB_NAME = "Try it"
COMPARE_FILES, COMPARE_WEIGHTS, COMPARE_BASE = ("another LoRA file", "the same LoRA at another weight",
                                                "the base model alone")
# what the second picture of a comparison is, from the form values
COMPARE_CHOICES: dict[str, Callable[[dict], tuple[str | None, float]]] = {
    COMPARE_FILES: lambda v: (text(v["lora_b"]) or None, number(v["weight_b"], "Second weight", float)),
    COMPARE_WEIGHTS: lambda v: (text(v["lora"]) or None, number(v["weight_b"], "Second weight", float)),
    COMPARE_BASE: lambda v: (None, 0.0),
}


@dataclass
class TryItTab:
    tab: gr.Tab
    fields: NamedFields
    generate: gr.Button
    compare: gr.Button
    refresh: gr.Button  # reads the output folder's LoRA files again
    unload: gr.Button
    note: gr.HTML
    gallery: gr.Gallery
    prefilled: gr.State  # {"base_model": ..., "lora": ...}: the values this page put in


def build_tryit_tab() -> TryItTab:
    with gr.Tab(TAB_NAME, id="try_it", elem_id="tab_try_it") as tab:
        with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
            base = build_options(TryItRequest, "tryit", "base_model")["base_model"]
            base.scale = 3  # as wide as the LoRA list beside it
            lora_info = request_infos(TryItRequest)["lora"]
            lora = gr.Dropdown(label=lora_info.label, elem_id="tryit_lora", scale=3, allow_custom_value=True,
                               choices=[], value=lora_info.default, info=f"{LORA_LIST_INFO} {lora_info.help}")
            refresh = gr.Button(REFRESH_LABEL, elem_id="tryit_refresh_loras", size="sm", scale=0, min_width=44)
            options = build_options(TryItRequest, "tryit", "weight")
        prompt = gr.Textbox(label="Prompt", elem_id="tryit_prompt", lines=2, max_lines=6,
                            placeholder="e.g. photo of sks dog on a beach")
        negative = gr.Textbox(label="Negative prompt", elem_id="tryit_negative", lines=1, max_lines=4)
        with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
            options |= build_options(TryItRequest, "tryit", "width", "height", "steps", "cfg_scale", "seed", "count",
                                     "sampler")
        with gr.Row(equal_height=True):
            generate = gr.Button("Generate", variant="primary", elem_id="tryit_generate", scale=3)
            unload = gr.Button("Free the model's memory", size="sm", elem_id="tryit_unload", scale=1)
        with gr.Accordion("Compare side by side (same seed)", open=True, elem_classes=["settings-section"]):
            with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
                mode = gr.Radio([COMPARE_FILES, COMPARE_WEIGHTS, COMPARE_BASE], value=COMPARE_FILES,
                                label="Compare the LoRA above with", elem_id="tryit_compare_mode", scale=3)
                lora_b = gr.Dropdown(label="Second LoRA file", elem_id="tryit_lora_b", scale=3, allow_custom_value=True,
                                     choices=[], value=None, info="e.g. an earlier epoch")
                weight = request_infos(TryItRequest)["weight"]
                weight_b = build_component(replace(weight, label="Second weight"), weight.default, "tryit_weight_b")
            compare = gr.Button("Compare", elem_id="tryit_compare")
        note = status_box("tryit_note")
        gallery = gr.Gallery(label="Images", elem_id="tryit_gallery", columns=2, height=420, object_fit="scale-down",
                             interactive=False, format="png")
        prefilled = gr.State({})  # inside the tab: a State between tabs splits the tab bar
    fields = NamedFields({"base_model": base, "lora": lora, "prompt": prompt, "negative_prompt": negative, **options,
                          "compare_with": mode, "lora_b": lora_b, "weight_b": weight_b})
    return TryItTab(tab, fields, generate, compare, refresh, unload, note, gallery, prefilled)


# ---- handlers as plain Python -----------------------------------------------------------------------


def prefill(prefilled: dict, source_model: str, saved: list[str], output_dir: str, base: str, lora: str):
    """Base model from the Source Model tab and LoRA from the newest saved file, unless the user chose others.

    Returns (base model, LoRA, LoRA choices, what was prefilled).
    """
    choices = lora_files(saved, output_dir)
    newest = choices[0] if choices else ""
    base_value = follow(base, prefilled.get("base_model"), text(source_model))
    lora_value = follow(lora, prefilled.get("lora"), newest)
    return base_value, lora_value, choices, {"base_model": base_value, "lora": lora_value}


def generate_images(models: ImageModels, values: dict, flags: dict, progress=None,
                    compare: bool = False) -> tuple[list, str, int]:
    """Images with captions for the gallery, a note for the page, and the gallery's column count."""
    from trainer.inference.tryit import LoraChoice

    refused = _refusal(values, compare)
    if refused:
        return [], problem(refused), 1
    started = time.perf_counter()
    if progress is not None:
        progress(0.0, desc="loading the base model")
    try:
        request = _request(values, flags)
        choices = [LoraChoice(text(values["lora"]) or None, number(values["weight"], "LoRA weight", float))]
        if compare:
            choices.append(LoraChoice(*COMPARE_CHOICES[values["compare_with"]](values)))
        with models.notes() as notes:
            results = models.tryit.compare(request, choices, progress_reporter(progress, "steps"))
    except USER_ERRORS as err:
        return [], problem(f"Not generated: {err}"), 1
    items = [(images[i], _caption(images[i])) for i in range(len(results[0])) for images in results]
    seeds = sorted({image.info.get("seed") for images in results for image in images})
    what = " vs ".join(c.label for c in choices)
    message = (f"{len(items)} image(s) in {time.perf_counter() - started:.1f} s: {what}; "
               f"seed {', '.join(str(s) for s in seeds)}")
    return items, done(message, notes), len(choices) if compare else min(len(items), 4)


def _request(values: dict, flags: dict):
    """The ``GenerateRequest`` of the form; ValueError naming an emptied number box."""
    from trainer.inference.tryit import GenerateRequest

    return GenerateRequest(
        base_model=text(values["base_model"]), prompt=text(values["prompt"]),
        negative_prompt=text(values["negative_prompt"]), width=number(values["width"], "Width"),
        height=number(values["height"], "Height"), steps=number(values["steps"], "Steps"),
        seed=number(values["seed"], "Seed"), cfg_scale=number(values["cfg_scale"], "CFG scale", float),
        sampler=values["sampler"], count=_in_range(number(values["count"], "Images"), "count"), **model_flags(flags),
    )


def _in_range(value, name: str):
    """The value within the option's declared range (a number box does not stop a typed value)."""
    info = request_infos(TryItRequest)[name]
    return min(max(value, info.ge), info.le)


def _refusal(values: dict, compare: bool) -> str:
    if not text(values["base_model"]):
        return "Choose the base model first (Source Model tab, or type its path here)."
    if not text(values["prompt"]):
        return "Type a prompt first."
    if compare and values["compare_with"] == COMPARE_FILES and not text(values["lora_b"]):
        return "Choose the second LoRA file to compare with (or compare with another weight)."
    if compare and values["compare_with"] == COMPARE_WEIGHTS and not text(values["lora"]):
        return "Choose the LoRA file to compare at two weights."
    return ""


def _caption(image) -> str:
    return f"{image.info.get('lora', '')} · seed {image.info.get('seed', '?')}"


# ---- wiring -----------------------------------------------------------------------------------------


def wire_tryit(tab: TryItTab, form_components: dict, runs, models: ImageModels) -> None:
    """``form_components``: the settings widgets by kohya key (Source Model path, flags, output folder)."""
    source, output_dir = form_components["pretrained_model_name_or_path"], form_components["output_dir"]
    flags = {"clip_skip": form_components["clip_skip"], "v_parameterization": form_components["v_parameterization"],
             **{name: form_components[name] for name in MODEL_FILE_INPUTS}}
    fields = tab.fields

    def refresh(data):
        base, lora, choices, prefilled = prefill(data[tab.prefilled], data[source], saved_lora_paths(runs.snapshot()),
                                                 data[output_dir], data[fields["base_model"]], data[fields["lora"]])
        return {fields["base_model"]: base, fields["lora"]: gr.update(choices=choices, value=lora or None),
                fields["lora_b"]: gr.update(choices=choices), tab.prefilled: prefilled}

    def run(compare: bool):
        def handler(data, progress=gr.Progress()):
            values = fields.values(data)
            flag_values = {name: data[c] for name, c in flags.items()}
            items, note, columns = generate_images(models, values, flag_values, progress, compare)
            return {tab.gallery: gr.update(value=items, columns=columns), tab.note: note}
        return handler

    inputs = fields.inputs(*flags.values())
    outputs = [tab.gallery, tab.note]
    refresh_io = dict(inputs=fields.inputs(tab.prefilled, source, output_dir),
                      outputs=[fields["base_model"], fields["lora"], fields["lora_b"], tab.prefilled], show_progress="hidden")
    tab.tab.select(refresh, **refresh_io)
    tab.refresh.click(refresh, **refresh_io)
    output_dir.change(refresh, trigger_mode="always_last", **refresh_io)
    for button, compare in ((tab.generate, False), (tab.compare, True)):
        button.click(run(compare), inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id="images")
    fields["prompt"].submit(run(False), inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id="images")
    tab.unload.click(lambda: done(models.unload()), outputs=tab.note, show_progress="hidden")


def wire_release_on_start(start: gr.Button, models: ImageModels) -> None:
    """Starting a training run frees the Try it model: the trainer needs that memory."""
    def release() -> None:
        models.unload()  # its message is for the Try it tab, not the training page

    start.click(release, show_progress="hidden")
