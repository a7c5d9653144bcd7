"""The Dataset Preparation tab: kohya's folder preparation (with Copy info to the Folders tab),
regularisation images (count, generate the missing ones) and the caption editor.

Layout and wiring only: ``dataset_actions`` and ``captions_actions`` hold the handlers.
The Folders tab is filled by setting name through the settings form's components.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from trainer.dataset_prep.requests import PrepareRequest
from trainer.inference.requests import RegImagesRequest

from . import captions_actions as captions
from . import dataset_actions as actions
from .tab_common import MODEL_FILE_INPUTS, ImageModels, NamedFields, done, follow, status_box
from .tools_actions import table
from .widgets import build_options

TAB_NAME = "Dataset Preparation"
FOLDER_HELP = ("Copies your images into kohya's layout: <code>&lt;destination&gt;/img/&lt;repeats&gt;_&lt;instance&gt; "
               "&lt;class&gt;</code>, regularisation images into <code>reg/&lt;repeats&gt;_&lt;class&gt;</code>, "
               "and makes <code>log/</code> and <code>model/</code>. The source folders are not changed.")


@dataclass
class DatasetTab:
    tab: gr.Tab
    prep: NamedFields
    prep_buttons: dict[str, gr.Button]
    prep_status: gr.HTML
    prep_report: gr.HTML
    reg: NamedFields
    reg_buttons: dict[str, gr.Button]
    reg_status: gr.HTML
    cap: NamedFields  # folder, caption, bulk operation, tags, replacement
    cap_buttons: dict[str, gr.Button]
    cap_out: dict[str, gr.components.Component]  # status, table, image, source, save_status, bulk_status, tags
    images: gr.State  # image paths in table order
    selected: gr.State  # the picked image's path
    prefilled: gr.State


def _box(label: str, elem_id: str, placeholder: str = "", **extra) -> gr.Textbox:
    return gr.Textbox(label=label, elem_id=elem_id, max_lines=1, placeholder=placeholder, **extra)


def build_dataset_tab() -> DatasetTab:
    with gr.Tab(TAB_NAME, id="dataset_preparation", elem_id="tab_dataset_preparation") as tab:
        prep, prep_buttons, prep_status, prep_report = _build_folder_preparation()
        reg, reg_buttons, reg_status = _build_reg_images()
        cap, cap_buttons, cap_out = _build_captions()
        states = gr.State([]), gr.State(""), gr.State({})  # inside the tab: a State between tabs splits the tab bar
    return DatasetTab(tab, prep, prep_buttons, prep_status, prep_report, reg, reg_buttons, reg_status, cap, cap_buttons,
                      cap_out, *states)


def _build_folder_preparation():
    with gr.Accordion("Folder preparation", open=True, elem_classes=["settings-section"]):
        gr.HTML(f'<div class="nk-note">{FOLDER_HELP}</div>')
        with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
            instance = _box("Instance prompt", "prep_instance", "e.g. sks (a rare token)", min_width=200)
            klass = _box("Class prompt", "prep_class", "e.g. dog", min_width=200)
        with gr.Row(equal_height=True, elem_classes=["nk-tool-row"]):
            images = _box("Training images", "prep_images", "folder with your training images", scale=4, min_width=320)
            options = build_options(PrepareRequest, "prep", "repeats")
        with gr.Row(equal_height=True, elem_classes=["nk-tool-row"]):
            reg = _box("Regularisation images (optional)", "prep_reg_images", "folder of class images", scale=4,
                       min_width=320)
            options |= build_options(PrepareRequest, "prep", "reg_repeats")
        with gr.Row(equal_height=True, elem_classes=["nk-tool-row"]):
            dest = _box("Destination training directory", "prep_destination", "a new or empty folder", scale=4,
                        min_width=320)
            options |= build_options(PrepareRequest, "prep", "merge")
        with gr.Row(equal_height=True):
            buttons = {
                "prepare": gr.Button("Prepare training data", variant="primary", elem_id="prep_run", scale=2),
                "preview": gr.Button("Preview (dry run)", elem_id="prep_preview", scale=1),
                "copy": gr.Button("Copy info to Folders tab", elem_id="prep_copy", scale=2),
            }
        status, report = status_box("prep_status"), status_box("prep_report")
    fields = NamedFields({"instance_prompt": instance, "class_prompt": klass, "images_dir": images,
                          "reg_images_dir": reg, "destination": dest, **options})
    return fields, buttons, status, report


def _build_reg_images():
    with gr.Accordion("Regularisation images", open=True, elem_classes=["settings-section"]):
        with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
            folder = _box("Regularisation folder", "reg_folder", "e.g. <destination>/reg/1_dog", scale=3, min_width=320)
            prompt = _box("Class prompt", "reg_class_prompt", "e.g. photo of a dog", scale=2, min_width=200)
        with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
            options = build_options(RegImagesRequest, "reg", "total", "width", "height", "steps", "sampler")
        with gr.Row(equal_height=True):
            buttons = {
                "count": gr.Button("Count", elem_id="reg_count", scale=1),
                "generate": gr.Button("Generate missing (Source Model)", variant="primary", elem_id="reg_generate",
                                      scale=2),
                "stop": gr.Button("Stop", variant="stop", elem_id="reg_stop", scale=1),
            }
        status = status_box("reg_status")
    fields = NamedFields({"folder": folder, "class_prompt": prompt, **options})
    return fields, buttons, status


def _build_captions():
    with gr.Accordion("Captions", open=True, elem_classes=["settings-section"]):
        with gr.Row(equal_height=True, elem_classes=["nk-tool-row", "nk-config-row"]):
            folder = _box("Images folder", "cap_folder", "the Image folder (train_data_dir) or one concept folder",
                          scale=4, min_width=320)
            load = gr.Button("Load", elem_id="cap_load", scale=1, min_width=110)
        out = {"status": status_box("cap_status")}
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=320):
                out["table"] = gr.Dataframe(table(captions.CAPTION_HEADERS, []), elem_id="cap_table", interactive=False,
                                            wrap=True, max_height=420, label="Images (click one to edit its caption)",
                                            column_widths=["22%", "18%", "14%", "46%"])
            with gr.Column(scale=2, min_width=260):
                out["image"] = gr.Image(label="Image", elem_id="cap_image", interactive=False, height=240, type="pil",
                                        buttons=[])
                caption = gr.Textbox(label="Caption", elem_id="cap_caption", lines=3, max_lines=8)
                out["source"] = status_box("cap_source")
                save = gr.Button("Save caption", variant="primary", elem_id="cap_save")
                out["save_status"] = status_box("cap_save_status")
        with gr.Row(equal_height=True, elem_classes=["nk-tool-row", "nk-config-row"]):
            operation = gr.Dropdown(list(captions.BULK_OPERATIONS), value=captions.ADD_START, label="Bulk edit",
                                    elem_id="cap_operation", min_width=170, scale=1)
            tags = _box("Tags", "cap_tags", "comma-separated, e.g. sks, smiling", scale=2, min_width=200)
            replacement = _box("Replace with", "cap_replacement", "(replace only)", scale=2, min_width=160)
            preview = gr.Button("Preview", elem_id="cap_bulk_preview", scale=0, min_width=100)
            apply = gr.Button("Apply", elem_id="cap_bulk_apply", scale=0, min_width=100)
        out["bulk_status"] = status_box("cap_bulk_status")
        out["tags"] = gr.Dataframe(table(captions.TAG_HEADERS, []), elem_id="cap_tag_table", interactive=False,
                                   max_height=300, label="Tag frequencies (images per tag)")
    fields = NamedFields({"folder": folder, "caption": caption, "operation": operation, "tags": tags,
                          "replacement": replacement})
    return fields, {"load": load, "save": save, "preview": preview, "apply": apply}, out


# ---- wiring -----------------------------------------------------------------------------------------


def wire_dataset(tab: DatasetTab, form_components: dict, models: ImageModels) -> None:
    _wire_folder_preparation(tab, form_components)
    _wire_reg_images(tab, form_components, models)
    _wire_captions(tab, form_components)


def _wire_folder_preparation(tab: DatasetTab, form: dict) -> None:
    ext = form["caption_extension"]
    followers = {"reg_folder": tab.reg["folder"], "reg_class": tab.reg["class_prompt"], "captions": tab.cap["folder"]}

    def prepare(data):
        values = tab.prep.values(data)
        status, report, settings = actions.prepare(values, data[ext])
        out = {tab.prep_status: status, tab.prep_report: report}
        if not settings:
            return out
        prefilled = dict(data[tab.prefilled])
        reg_folder = actions.reg_folder_for(values["destination"], values["class_prompt"], values["reg_repeats"])
        new = {"reg_folder": reg_folder, "reg_class": values["class_prompt"], "captions": settings["train_data_dir"]}
        for name, box in followers.items():
            out[box] = prefilled[name] = follow(data[box], prefilled.get(name), new[name])
        return {**out, tab.prefilled: prefilled}

    def preview(data):
        status, report, _ = actions.prepare(tab.prep.values(data), data[ext], dry_run=True)
        return status, report

    def copy_info(destination):
        status, settings = actions.copy_info(destination)
        return {tab.prep_status: status, **{form[key]: value for key, value in settings.items()}}

    tab.prep_buttons["prepare"].click(prepare, inputs=tab.prep.inputs(ext, tab.prefilled, *followers.values()),
                                      outputs=[tab.prep_status, tab.prep_report, tab.prefilled, *followers.values()])
    tab.prep_buttons["preview"].click(preview, inputs=tab.prep.inputs(ext), outputs=[tab.prep_status, tab.prep_report])
    tab.prep_buttons["copy"].click(copy_info, inputs=tab.prep["destination"],
                                   outputs=[tab.prep_status, *(form[key] for key in actions.FOLDER_KEYS)])


def _wire_reg_images(tab: DatasetTab, form: dict, models: ImageModels) -> None:
    source = form["pretrained_model_name_or_path"]
    flags = {"clip_skip": form["clip_skip"], "v_parameterization": form["v_parameterization"],
             **{name: form[name] for name in MODEL_FILE_INPUTS}}

    def generate(data, progress=gr.Progress()):
        flag_values = {name: data[c] for name, c in flags.items()}
        return actions.generate_reg(models, data[source], tab.reg.values(data), flag_values, progress)

    def stop():
        models.stop_requested.set()
        return done("Stopping after the current image; the images made so far are kept.")

    tab.reg_buttons["count"].click(actions.count_reg, inputs=[tab.reg["folder"], tab.reg["total"]],
                                   outputs=tab.reg_status, show_progress="hidden")
    tab.reg_buttons["generate"].click(generate, inputs=tab.reg.inputs(source, *flags.values()), outputs=tab.reg_status,
                                      concurrency_limit=1, concurrency_id="images")
    tab.reg_buttons["stop"].click(stop, outputs=tab.reg_status, queue=False, show_progress="hidden")


def _wire_captions(tab: DatasetTab, form: dict) -> None:
    ext, train_dir = form["caption_extension"], form["train_data_dir"]
    folder, out = tab.cap["folder"], tab.cap_out

    def reload(path, extension):
        status, rows, images = captions.listing(path, extension)
        headers, tag_rows = captions.tag_table(path, extension)
        return status, table(captions.CAPTION_HEADERS, rows), images, table(headers, tag_rows)

    def load(path, extension):
        status, rows, images, tags = reload(path, extension)
        return {out["status"]: status, out["table"]: rows, tab.images: images, out["tags"]: tags, tab.selected: "",
                out["image"]: None, tab.cap["caption"]: "", out["source"]: "", out["save_status"]: ""}

    def select(images, extension, evt: gr.SelectData):
        path, preview, caption, source = captions.pick(images, evt.index[0], extension)
        return {tab.selected: path, out["image"]: preview, tab.cap["caption"]: caption, out["source"]: source,
                out["save_status"]: ""}

    def save(path, caption, selected, extension):
        status = captions.save(selected, caption, extension)
        _, rows, _, tags = reload(path, extension)
        return {out["save_status"]: status, out["table"]: rows, out["tags"]: tags}

    def bulk(dry_run: bool):
        def handler(data):
            values = tab.cap.values(data)
            status = captions.bulk_edit(values["folder"], values["operation"], values["tags"], values["replacement"],
                                        data[ext], dry_run)
            if dry_run:
                return {out["bulk_status"]: status}
            _, rows, _, tags = reload(values["folder"], data[ext])
            return {out["bulk_status"]: status, out["table"]: rows, out["tags"]: tags}
        return handler

    def follow_train_dir(current, train_data_dir, prefilled):
        value = follow(current, prefilled.get("captions"), train_data_dir)
        return value, {**prefilled, "captions": value}

    load_outputs = [out["status"], out["table"], tab.images, out["tags"], tab.selected, out["image"],
                    tab.cap["caption"], out["source"], out["save_status"]]
    tab.cap_buttons["load"].click(load, inputs=[folder, ext], outputs=load_outputs)
    folder.submit(load, inputs=[folder, ext], outputs=load_outputs)
    out["table"].select(select, inputs=[tab.images, ext], outputs=[tab.selected, out["image"], tab.cap["caption"],
                                                                   out["source"], out["save_status"]])
    tab.cap_buttons["save"].click(save, inputs=[folder, tab.cap["caption"], tab.selected, ext],
                                  outputs=[out["save_status"], out["table"], out["tags"]])
    bulk_outputs = [out["bulk_status"], out["table"], out["tags"]]
    tab.cap_buttons["preview"].click(bulk(True), inputs=tab.cap.inputs(ext), outputs=bulk_outputs)
    tab.cap_buttons["apply"].click(bulk(False), inputs=tab.cap.inputs(ext), outputs=bulk_outputs)
    tab.tab.select(follow_train_dir, inputs=[folder, train_dir, tab.prefilled], outputs=[folder, tab.prefilled],
                   show_progress="hidden")
