"""Caption processing per sample, as sd-scripts' ``process_caption``.

0. a prefix and a suffix (a dataset config subset's ``caption_prefix``/``caption_suffix``) are joined to it
   with a space;
1. the whole caption is dropped to "" with probability ``dropout_rate``, or on every
   ``dropout_every_n_epochs``-th epoch (epochs are 1-based, as in sd-scripts);
2. otherwise, when shuffling or tag dropout is on, the caption is split on the
   separator, the first ``keep_tokens`` tags stay in front, the rest are shuffled
   and each may be dropped, and the tags are re-joined with ", ".

All randomness comes from the ``rng`` passed in, so a resumed run repeats it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CaptionConfig:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    tag_dropout_rate: float = 0.0
    separator: str = ","
    prefix: str = ""  # sd-scripts' caption_prefix (dataset config only)
    suffix: str = ""  # sd-scripts' caption_suffix (dataset config only)

    @classmethod
    def from_settings(cls, settings: Any) -> "CaptionConfig":
        return cls(
            shuffle=bool(settings.shuffle_caption),
            keep_tokens=max(0, int(settings.keep_tokens or 0)),
            dropout_rate=float(settings.caption_dropout_rate or 0.0),
            dropout_every_n_epochs=max(0, int(settings.caption_dropout_every_n_epochs or 0)),
            tag_dropout_rate=float(settings.caption_tag_dropout_rate or 0.0),
        )

    @property
    def rewrites_tags(self) -> bool:
        return self.shuffle or self.tag_dropout_rate > 0

    @property
    def is_static(self) -> bool:
        """True when every sample's caption is always its file's caption (text-encoder outputs can be cached)."""
        return (not self.rewrites_tags and self.dropout_rate <= 0 and self.dropout_every_n_epochs <= 0
                and not self.prefix and not self.suffix)


def is_caption_dropped(config: CaptionConfig, epoch: int, rng: random.Random) -> bool:
    # the rng is only consumed when the rate is on, so turning dropout off does not change other draws
    if config.dropout_rate > 0 and rng.random() < config.dropout_rate:
        return True
    return config.dropout_every_n_epochs > 0 and epoch % config.dropout_every_n_epochs == 0


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Tags stripped of spaces; empty ones (from ",," or a trailing comma) are dropped."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def shuffle_tags(caption: str, config: CaptionConfig, rng: random.Random) -> str:
    tags = split_tags(caption, config.separator)
    fixed, flexible = tags[: config.keep_tokens], tags[config.keep_tokens :]
    if config.shuffle:
        rng.shuffle(flexible)
    if config.tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= config.tag_dropout_rate]
    return ", ".join(fixed + flexible)


def process_caption(caption: str, config: CaptionConfig, epoch: int, rng: random.Random) -> str:
    """The caption a sample trains with in this epoch."""
    if config.prefix:
        caption = config.prefix + " " + caption
    if config.suffix:
        caption = caption + " " + config.suffix
    if is_caption_dropped(config, epoch, rng):
        return ""
    if config.rewrites_tags:
        return shuffle_tags(caption, config, rng)
    return caption
