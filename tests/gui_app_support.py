"""Helpers for tests that drive a freshly built app through its own handlers, as Gradio calls them."""
from __future__ import annotations


def fresh_app(presets_dir):
    """The whole page, built as at a (re)start: no run has saved anything yet."""
    from app.run_manager import RunManager
    from app.ui import build_app

    return build_app(run_manager=RunManager(), user_presets_dir=presets_dir)


def component(demo, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def run_handlers(demo, trigger, event: str, overrides: dict) -> list:
    """Call every handler bound to ``trigger``'s ``event`` as Gradio does: its input widgets' values (their
    current values unless overridden), as a dict for a set of inputs, else in order."""
    results = []
    for fn in demo.fns.values():
        if (trigger._id, event) in fn.targets:
            values = [overrides.get(c, c.value) for c in fn.inputs]  # a widget may be listed twice
            results.append(fn.fn(dict(zip(fn.inputs, values))) if fn.inputs_as_dict else fn.fn(*values))
    assert results, f"nothing is bound to {event} of {trigger.elem_id}"
    return results
