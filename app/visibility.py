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


def wire_visibility(components: Mapping[str, gr.components.Component], initial: Mapping[str, Any]) -> None:
    """Set the initial visibility and re-evaluate it whenever a controlling setting changes."""
    for key, visible in visibility(initial).items():
        components[key].visible = visible
    for control, keys in dependents().items():
        controllers = sorted({k for key in keys for k, _ in setting_info(key).visible_when})

        def update(*values, keys=tuple(keys), controllers=tuple(controllers)):
            current = dict(zip(controllers, values))
            return [gr.update(visible=setting_info(k).is_visible(current)) for k in keys]

        components[control].change(
            update, inputs=[components[k] for k in controllers], outputs=[components[k] for k in keys],
            queue=False, show_progress="hidden",
        )
