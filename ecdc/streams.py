"""Byte-stream plumbing shared by every writer: the stdio marker and a write that never drops data.

Torch-free: the container layer uses it too.
"""

from __future__ import annotations

from typing import BinaryIO

from .errors import OutputError

STDIO = "-"
"""The path that means standard input or standard output, as in every Unix tool."""


def write_all(fileobj: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``, looping over partial writes.

    Raw (unbuffered) file objects may write only part of what they are given, and return
    None when a non-blocking stream cannot take anything now; dropping the rest silently
    would leave a file with a hole, so that is an error.
    """
    view = memoryview(data)
    while view:
        n = fileobj.write(view)
        if n is None:
            raise OutputError("the output stream is non-blocking and refused data; nothing more was written")
        view = view[n:]
