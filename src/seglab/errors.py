"""The one exception type for mistakes a user can fix.

Anything raised as :class:`SeglabError` reaches the command line as a single line
``seglab: error: <message>`` and exit status 2, without a traceback. Its message must
name the file or flag at fault and say what to do about it.
"""

from typing import Any


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, cut to ``limit`` characters; its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def short(value: Any) -> str:
    """A value from a file, shown in a message: its repr, cut to 40 characters (files can hold anything)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class SeglabError(Exception):
    """A user error: bad path, bad flag, bad data. Printed as one line, exit status 2."""


class BadSample(SeglabError):
    """One sample cannot be used: its image or mask is missing, empty, truncated or not an image,
    or the two differ in size. Training reports and skips such samples unless --strict-data."""
