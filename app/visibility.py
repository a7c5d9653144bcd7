"""Show or hide setting widgets as the settings they depend on change.

The rules are data in the settings declarations (``visible_when``), e.g. the
convolution rank only for LoCon types, the SDXL options only for SDXL models,
the multires fields only for the Multires noise type. Values are kept when hidden.
"""
from __future__ import annotations

from typing import Any, Mapping

import gradio as gr

from trainer.settings import setting_info, setting_infos


def dependents() -> dict[str, list[str]]:
    """Controlling setting -> the settings whose visibility depends on it."""
    out: dict[str, list[str]] = {}
    for info in setting_infos():
        for key, _ in info.visible_when:
            out.setdefault(key, []).append(info.key)
    return out


def visibility(values: Mapping[str, Any]) -> dict[str, bool]:
    """Setting key -> visible, for every setting that has a rule."""
    return {info.key: info.is_visible(values) for info in setting_infos() if info.visible_when}


def wire_visibility(components: Mapping[str, gr.components.Component], initial: Mapping[str, Any],
                    sections: Mapping[gr.components.Component, list[str]] | None = None) -> None:
    """Set the initial visibility and re-evaluate it whenever a controlling setting changes. A section whose
    settings all have rules (the LyCORIS options, the SDXL ones) hides with them instead of showing empty."""
    ruled = {box: keys for box, keys in (sections or {}).items() if all(setting_info(k).visible_when for k in keys)}
    shown = visibility(initial)
    for key, visible in shown.items():
        components[key].visible = visible
    for box, keys in ruled.items():
        box.visible = any(shown[k] for k in keys)
    for control, keys in dependents().items():
        boxes = [(box, members) for box, members in ruled.items() if set(members) & set(keys)]
        rules = {k for key in keys for k, _ in setting_info(key).visible_when}
        rules |= {k for _, members in boxes for m in members for k, _ in setting_info(m).visible_when}
        controllers = sorted(rules)

        def update(*values, keys=tuple(keys), boxes=tuple(boxes), controllers=tuple(controllers)):
            current = dict(zip(controllers, values))
            widgets = [gr.update(visible=setting_info(k).is_visible(current)) for k in keys]
            return widgets + [gr.update(visible=any(setting_info(m).is_visible(current) for m in members))
                              for _, members in boxes]

        components[control].change(
            update, inputs=[components[k] for k in controllers],
            outputs=[components[k] for k in keys] + [box for box, _ in boxes], queue=False, show_progress="hidden",
        )
