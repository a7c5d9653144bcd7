"""Caption processing: keep_tokens, shuffle determinism, dropout rules."""
import random
from types import SimpleNamespace

from trainer.data.captions import CaptionConfig, process_caption, split_tags

CAPTION = "sks dog, red collar, grass, sunny, park, running, closeup"


def test_no_processing_returns_the_caption_unchanged():
    assert process_caption("a,b ,  c", CaptionConfig(), 1, random.Random(0)) == "a,b ,  c"


def test_shuffle_keeps_the_first_tokens_and_rejoins_with_comma_space():
    config = CaptionConfig(shuffle=True, keep_tokens=2)
    outputs = {process_caption(CAPTION, config, 1, random.Random(seed)) for seed in range(30)}
    assert len(outputs) > 10  # it really shuffles
    for output in outputs:
        tags = output.split(", ")
        assert tags[:2] == ["sks dog", "red collar"]
        assert sorted(tags) == sorted(split_tags(CAPTION))


def test_shuffle_is_deterministic_for_the_same_rng_seed():
    config = CaptionConfig(shuffle=True, keep_tokens=1)
    first = [process_caption(CAPTION, config, 1, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert [process_caption(CAPTION, config, 1, rng_a) for _ in range(5)] == [
        process_caption(CAPTION, config, 1, rng_b) for _ in range(5)
    ]


def test_empty_tags_are_dropped_when_rewriting():
    assert process_caption("a,, b ,", CaptionConfig(shuffle=True, keep_tokens=5), 1, random.Random(0)) == "a, b"


def test_dropout_rate_drops_about_that_share():
    config = CaptionConfig(dropout_rate=0.25)
    rng = random.Random(1)
    dropped = sum(process_caption(CAPTION, config, 1, rng) == "" for _ in range(4000))
    assert 850 < dropped < 1150


def test_dropout_every_n_epochs_uses_one_based_epochs():
    config = CaptionConfig(dropout_every_n_epochs=3)
    results = {epoch: process_caption(CAPTION, config, epoch, random.Random(0)) for epoch in range(1, 8)}
    assert [e for e, c in results.items() if c == ""] == [3, 6]


def test_tag_dropout_never_drops_kept_tokens():
    config = CaptionConfig(keep_tokens=1, tag_dropout_rate=0.5)
    rng = random.Random(2)
    outputs = [process_caption(CAPTION, config, 1, rng) for _ in range(50)]
    assert all(o.startswith("sks dog") for o in outputs)
    assert any(len(o.split(", ")) < 7 for o in outputs)
    assert not config.is_static and CaptionConfig().is_static


def test_from_settings_reads_kohya_keys():
    settings = SimpleNamespace(
        shuffle_caption=True, keep_tokens=2, caption_dropout_rate=0.1, caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.25,
    )
    assert CaptionConfig.from_settings(settings) == CaptionConfig(True, 2, 0.1, 0, 0.25)
