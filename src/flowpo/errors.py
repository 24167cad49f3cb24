"""Errors that the command line prints as one line (no traceback), and the helpers that keep that
line short."""
from __future__ import annotations

from typing import Any

SHOW_LIMIT = 80
"""Characters of a value shown in an error line (longer ones are abbreviated in the middle)."""

LINE_LIMIT = 1000
"""Characters of one error line (the CLI cuts a longer one in the middle)."""


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming key, value and what is allowed."""


class CheckpointError(ValueError):
    """A checkpoint that verifies but does not load (a malformed tensor file, a tensor of the wrong
    shape, non-finite weights, a state.json out of range): readers skip it like a damaged one."""


def abbrev(text: str, limit: int = SHOW_LIMIT) -> str:
    """`text` on one line, cut in the middle to at most about `limit` characters."""
    text = " ".join(str(text).split()) if "\n" in str(text) else str(text)
    if len(text) <= limit:
        return text
    half = max(1, (limit - 20) // 2)
    return f"{text[:half]}…[{len(text) - 2 * half} characters]…{text[-half:]}"


def show(value: Any, limit: int = SHOW_LIMIT) -> str:
    """repr(value), abbreviated (a huge string, list or alias-expanded mapping stays one short phrase)."""
    try:
        r = repr(value)
    except RecursionError:
        r = f"<a {type(value).__name__} nested too deep to show>"
    return abbrev(r, limit)
