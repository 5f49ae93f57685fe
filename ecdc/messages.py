"""The vocabulary of user messages: how an exception becomes the one line a user reads.

Torch-free, so every layer may use it.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
