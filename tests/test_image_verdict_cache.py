"""The image-verdict cache is shared by the GUI's checks (two at once) and the training thread's deep check."""
from __future__ import annotations

import json
import sys
import threading

import pytest
from PIL import Image

from trainer.preflight import image_check


@pytest.fixture
def big_saved_table(tmp_path, monkeypatch):
    """A saved table of 100k verdicts that the next check loads: saving it takes long enough to be overlapped."""
    monkeypatch.setenv("NEKOYA_CACHE_DIR", str(tmp_path / "cache"))
    image_check.clear_cache(disk=True)
    rows = [[f"/gone/{i}.png", i, 100, None] for i in range(100_000)]
    cache_file = tmp_path / "cache" / "preflight" / "image_verdicts.json"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(json.dumps({"version": 1, "verdicts": rows}), encoding="utf-8")
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so an unguarded table is caught mid-iteration
    yield cache_file
    sys.setswitchinterval(previous)
    image_check.clear_cache(disk=True)


def _new_image(folder, name):
    path = folder / f"{name}.png"
    Image.new("RGB", (8, 8), (len(name) % 255, 0, 0)).save(path)
    return path


def test_concurrent_checks_and_a_clear_never_break_each_other(tmp_path, big_saved_table):
    failures: list[BaseException] = []
    bad_seen: list[dict] = []

    def checker(worker: int) -> None:
        try:
            for round_ in range(6):
                image = _new_image(tmp_path, f"w{worker}_{round_}")  # new each round: decoded, remembered, saved
                bad_seen.append(image_check.verify_images([image]).bad)
        except BaseException as exc:  # noqa: BLE001 - the test reports what the thread raised
            failures.append(exc)

    def clearer() -> None:
        try:
            for _ in range(20):
                image_check.clear_cache()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=checker, args=(n,)) for n in range(3)] + [threading.Thread(target=clearer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert len(bad_seen) == 18 and not any(bad_seen)
    saved = json.loads(big_saved_table.read_text(encoding="utf-8"))
    assert saved["version"] == 1 and saved["verdicts"]  # the last save is whole JSON


def test_a_broken_image_keeps_its_verdict_across_threads(tmp_path, big_saved_table):
    broken = tmp_path / "broken.png"
    broken.write_bytes(_new_image(tmp_path, "whole").read_bytes()[:-20])
    verdicts: list[dict] = []
    threads = [threading.Thread(target=lambda: verdicts.append(image_check.verify_images([broken]).bad))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(verdicts) == 4
    assert all(list(bad) == [broken] and "cannot be decoded" in bad[broken] for bad in verdicts)
