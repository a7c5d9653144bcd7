"""Outside trainer/families/, no code names a model family by its key; the family specs own the keys.

The one exception is the kohya-compat boundary: kohya_ss's settings name a checkbox ``sdxl``.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILY_KEY = re.compile(r'"(sd1|sd2|sdxl|sd2v|flux1)"')
# (file, line): kohya's setting field `sdxl`, not the family key
KOHYA_BOUNDARY = {("trainer/settings/tab_parameters.py", 'ONLY_SDXL = {"sdxl": (True,)}')}


def family_key_lines(root: Path, *packages: str) -> list[tuple[str, str]]:
    """(file, line) of every line in ``packages`` outside trainer/families/ that quotes a family key."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if name.startswith("trainer/families/"):
                continue
            found += [(name, line.strip()) for line in path.read_text().splitlines() if FAMILY_KEY.search(line)]
    return found


def test_only_the_kohya_boundary_quotes_a_family_key():
    stray = [(name, line) for name, line in family_key_lines(ROOT, "trainer", "app")
             if not any(name == file and line.startswith(allowed) for file, allowed in KOHYA_BOUNDARY)]
    assert stray == [], "ask the family spec (trainer.families) instead of naming a family:\n" + "\n".join(
        f"{name}: {line}" for name, line in stray)


def test_the_scan_finds_a_quoted_family_key(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text('LAYOUT = "sd2v"\nOTHER = "sd15"\n')
    assert family_key_lines(tmp_path, "pkg") == [("pkg/m.py", 'LAYOUT = "sd2v"')]
