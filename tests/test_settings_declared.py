"""Every setting the trainer reads is declared in the settings model (none read through pydantic extras)."""
from __future__ import annotations

import ast
from pathlib import Path

from test_preflight_support import problems, settings
from trainer.data.captions import CaptionConfig
from trainer.preflight import check
from trainer.settings import TrainingSettings, settings_from_dict

TRAINER = Path(__file__).resolve().parent.parent / "trainer"
SETTINGS_NAMES = ("s", "settings")
# Attributes of other objects held in variables named like the settings: BucketSettings
# (buckets.py), a skipped image (preflight, data plan), a state dict. No setting has these names.
OTHER_OBJECT_ATTRIBUTES = {"min_reso", "max_reso", "reso_steps", "no_upscale", "path", "reason", "items"}


def _is_settings(node: ast.AST | None) -> bool:
    """``settings`` / ``s``, or ``<anything>.settings`` (``ctx.settings``, ``self.settings``)."""
    return (isinstance(node, ast.Name) and node.id in SETTINGS_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "settings")


def _read_name(node: ast.AST) -> str | None:
    """``settings.x`` (a load) or ``getattr(settings, "x"...)``: the name read, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_settings(node.value):
        return node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        target, name = (node.args + [None, None])[:2]
        if _is_settings(target) and isinstance(name, ast.Constant):
            return name.value
    return None


def settings_reads() -> set[tuple[str, str, int]]:
    reads = set()
    for path in TRAINER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = _read_name(node)
            if name:
                reads.add((path.relative_to(TRAINER).as_posix(), name, node.lineno))
    return reads


def test_every_settings_read_in_the_trainer_is_declared():
    reads = settings_reads()
    assert any(name == "caption_tag_dropout_rate" for _, name, _ in reads)  # the walk sees the reads
    undeclared = sorted(
        f"trainer/{file}:{line} reads {name!r}" for file, name, line in reads
        if name not in TrainingSettings.model_fields and not hasattr(TrainingSettings, name)
        and name not in OTHER_OBJECT_ATTRIBUTES
    )
    assert undeclared == []


def test_caption_tag_dropout_rate_from_a_config_is_known_and_used():
    report = settings_from_dict({"caption_tag_dropout_rate": "0.3"})
    assert report.unknown_keys == [] and "caption_tag_dropout_rate" not in report.settings.kept_kohya_values()
    assert report.settings.caption_tag_dropout_rate == 0.3
    assert CaptionConfig.from_settings(report.settings).tag_dropout_rate == 0.3


def test_the_check_says_tag_dropout_has_no_effect_on_cached_text_encoder_outputs(tmp_path, tiny_sdxl_file):
    report = check(settings(tmp_path, tiny_sdxl_file, sdxl=True, sdxl_cache_text_encoder_outputs=True,
                            caption_tag_dropout_rate=0.2))
    [warning] = problems(report, "warning", "caption_tag_dropout_rate")
    assert warning.message.startswith("Rate of tag dropout has no effect")
