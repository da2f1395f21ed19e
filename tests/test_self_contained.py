"""The repository stands on its own: no file points at a machine path or a
document outside the repo; evidence is cited by upstream URL or repo path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# built from pieces so this file does not match itself
OUTSIDE = [re.compile(p) for p in (
    "/" + "work/shared", r"\.\./" + "shared/", "shared/" + "facts", r"\bfacts" + r"(/| §|\.md)",
    r"\b(detection|pins_evidence|uv_indexes|flash_attention|therock)" + r"\.md\b",
)]


def _files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if (REPO / n).is_file() and not n.startswith("tests/data/")]


def test_no_file_cites_anything_outside_the_repo():
    hits = []
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert hits == []


def test_design_doc_cites_no_tracker_issue_numbers():
    text = (REPO / "docs/design.md").read_text()
    assert not re.search(r"\(issue \d+\)", text)


def test_every_pin_key_is_in_the_design_doc():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    pins = tomllib.loads((REPO / "recipes/pins.toml").read_text())
    doc = (REPO / "docs/design.md").read_text()
    listing = doc[doc.index("## Pin keys"):]
    for table, keys in pins.items():
        line = next(line for line in listing.splitlines() if line.strip().startswith(f"[{table}]"))
        for key in keys:
            assert re.search(rf"\b{re.escape(key)}\b", line), f"{table}.{key} missing from docs/design.md"
