"""Bind handlers to the settings widgets by name, never by position.

Gradio passes a dict keyed by component when ``inputs`` is a set, and accepts a
dict keyed by component as a return value. ``SettingsForm`` translates both to
and from dicts keyed by setting name (kohya_ss's JSON keys).
"""
from __future__ import annotations

from typing import Any, Mapping

import gradio as gr


class SettingsForm:
    def __init__(self, components: Mapping[str, gr.components.Component], kept: gr.State):
        self.components = dict(components)
        self.kept = kept  # kohya keys of a loaded config that have no widget (saved back unchanged)
        self._names = {id(c): name for name, c in self.components.items()}

    def inputs(self, *extra: gr.components.Component) -> set:
        """Every settings widget and the kept keys, plus ``extra`` components."""
        return {*self.components.values(), self.kept, *extra}

    def values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        """Setting name -> value from Gradio's component-keyed input dict."""
        return {self._names[id(c)]: v for c, v in data.items() if id(c) in self._names}

    def kept_values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        return dict(data.get(self.kept) or {})

    def updates(self, values: Mapping[str, Any]) -> dict[gr.components.Component, Any]:
        """Component-keyed output dict from a name-keyed dict (unknown names are a bug: KeyError)."""
        return {self.components[name]: value for name, value in values.items()}

    def outputs(self, *extra: gr.components.Component) -> list:
        return [*self.components.values(), self.kept, *extra]
