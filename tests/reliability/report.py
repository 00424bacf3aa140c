"""The reliability figures: every scenario records what it injected and what it found, and the
session ends with a table and one machine-readable line (printed by ``conftest.py``):

``crashes=N faults=N hostile=N expected=N stored=N duplicated=N lost=N wrong_post_actions=N``

Scenarios record their figures *before* asserting on them, so a failing run still shows how it
failed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

SECTIONS = ("crash", "fault", "hostile")


@dataclass(frozen=True)
class Row:
    section: str  # "crash" | "fault" | "hostile"
    kind: str  # e.g. "SIGKILL, after=move:Archive", "cut: mid-FETCH literal"
    injected: int  # crashes, faults or hostile messages
    expected: int  # messages that had to end up stored
    stored: int  # of those, stored (once or more)
    duplicated: int  # extra copies of a message (blobs beyond the first per message)
    lost: int  # expected but not stored
    wrong_post_actions: int  # seen/moved/deleted without being stored, or the wrong message
    note: str = ""


_rows: list[Row] = []
_lock = threading.Lock()


def record(
    section: str,
    kind: str,
    *,
    injected: int,
    expected: int,
    stored: int,
    duplicated: int = 0,
    lost: int | None = None,
    wrong_post_actions: int = 0,
    note: str = "",
) -> Row:
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}")
    row = Row(
        section,
        kind,
        injected,
        expected,
        stored,
        duplicated,
        expected - stored if lost is None else lost,
        wrong_post_actions,
        note,
    )
    with _lock:
        _rows.append(row)
    return row


def rows() -> list[Row]:
    with _lock:
        return list(_rows)


def totals(selected: list[Row] | None = None) -> dict[str, int]:
    chosen = rows() if selected is None else selected
    return {
        "crashes": sum(r.injected for r in chosen if r.section == "crash"),
        "faults": sum(r.injected for r in chosen if r.section == "fault"),
        "hostile": sum(r.injected for r in chosen if r.section == "hostile"),
        "expected": sum(r.expected for r in chosen),
        "stored": sum(r.stored for r in chosen),
        "duplicated": sum(r.duplicated for r in chosen),
        "lost": sum(r.lost for r in chosen),
        "wrong_post_actions": sum(r.wrong_post_actions for r in chosen),
    }


def machine_line(selected: list[Row] | None = None) -> str:
    return " ".join(f"{key}={value}" for key, value in totals(selected).items())


_COLUMNS = ("injected", "expected", "stored", "duplicated", "lost", "wrong post-actions")


def table(selected: list[Row] | None = None) -> list[str]:
    """The figures as a plain-text table (also valid Markdown), one row per scenario."""
    chosen = rows() if selected is None else selected
    headers = ("section", "scenario", *_COLUMNS, "note")
    body = [
        (
            r.section,
            r.kind,
            str(r.injected),
            str(r.expected),
            str(r.stored),
            str(r.duplicated),
            str(r.lost),
            str(r.wrong_post_actions),
            r.note,
        )
        for r in chosen
    ]
    t = totals(chosen)
    body.append(
        (
            "total",
            f"{t['crashes']} crashes, {t['faults']} faults, {t['hostile']} hostile messages",
            str(t["crashes"] + t["faults"] + t["hostile"]),
            str(t["expected"]),
            str(t["stored"]),
            str(t["duplicated"]),
            str(t["lost"]),
            str(t["wrong_post_actions"]),
            "",
        )
    )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(headers), rule, *(line(row) for row in body)]
