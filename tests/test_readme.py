"""The README's Troubleshooting table quotes messages seglab can really print.

Each message in the table's second column is cut at its placeholders (``<file>``) and ellipses; every
piece of 20 characters or more must be literal text of seglab's source: inside one string, or joined
from the end of one, whole others and the start of another (messages are built from parts). A reworded
message in the code, or one the README invented, fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def code_pieces() -> list[str]:
    """The literal parts of every string in src/seglab: f-strings are cut at their {fields}."""
    pieces: list[str] = []
    for path in (ROOT / "src" / "seglab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                pieces += [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.append(node.value)
    return pieces


def troubleshooting_messages() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    messages = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 2 and not set(cells[1]) <= set("-|"):
            messages += [m for m in re.findall(r"``(.+?)``|`([^`]+)`", cells[1]) for m in m if m]
    return [m for m in messages if len(m) >= 30 and not m.startswith(("seglab ", "pytest"))]


def test_the_table_lists_many_messages():
    assert len(troubleshooting_messages()) >= 50


def printable(fragment: str, pieces: list[str], whole: set[str], heads: set[str], tails: set[str]) -> bool:
    """Can seglab print ``fragment``: is it inside one string, or the end of one string, whole
    strings, then the start of another (a message put together from parts)?"""
    if any(fragment in p for p in pieces):
        return True
    n = len(fragment)
    reached = {k for k in range(1, n) if fragment[:k] in tails}
    frontier = sorted(reached)
    while frontier:
        i = frontier.pop()
        if fragment[i:] in heads:
            return True
        for j in range(i + 1, min(n, i + 200) + 1):
            if fragment[i:j] in whole and j not in reached:
                if j == n:
                    return True
                reached.add(j)
                frontier.append(j)
    return False


def test_every_message_in_the_troubleshooting_table_is_in_the_code():
    pieces = code_pieces()
    whole = set(pieces)
    heads = {p[:k] for p in pieces for k in range(1, min(len(p), 200) + 1)}
    tails = {p[-k:] for p in pieces for k in range(1, min(len(p), 200) + 1)}
    assert not printable("; seglab never prints this sentence at all", pieces, whole, heads, tails)  # the check bites
    missing = []
    for message in troubleshooting_messages():
        for fragment in re.split(r"<[^>]*>|\.\.\.|…", message):
            if len(fragment.strip()) >= 20 and not printable(fragment, pieces, whole, heads, tails):
                missing.append(f"{fragment!r} (in: {message[:80]})")
    assert not missing, "\n".join(missing)
