"""Errors that the command line prints as one line (no traceback)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming key, value and what is allowed."""
