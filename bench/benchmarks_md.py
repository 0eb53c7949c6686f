"""Shared by the bench scripts: insert result rows into BENCHMARKS.md below a section's marker line."""

import os

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def append_rows(marker: str, rows: list[str]) -> None:
    """Newest rows first, right under `marker`; a missing marker is an error (add the section first)."""
    with open(PATH) as f:
        text = f.read()
    if marker not in text:
        raise SystemExit(f"--write: no {marker} line in {PATH}; add the section first")
    with open(PATH, "w") as f:
        f.write(text.replace(marker, marker + "\n" + "\n".join(rows), 1))
