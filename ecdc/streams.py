"""Byte-stream plumbing shared by every writer: the stdio marker and a write that never drops data.

Torch-free: the container layer uses it too.
"""

from __future__ import annotations

from typing import Any, BinaryIO

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
            # Only a stream someone else opened can be non-blocking: standard output, named as such.
            name = getattr(fileobj, "name", None)
            raise OutputError("the output stream is non-blocking and refused data; nothing more was written",
                              where="<stdout>" if name in ("<stdout>", 1) else None)
        view = view[n:]


class CountingStream:
    """A binary stream (standard input or output) that counts the bytes that pass through
    it, whose sizes no ``stat`` can tell, for the end-of-run stats.

    ``count`` is how far into the stream reading or writing got (a seek back and a second
    read of the same bytes do not count twice). Everything else is the wrapped stream's.
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.count = 0
        self._pos = 0  #: relative to where the stream was when wrapped

    def _moved(self, n: int) -> None:
        self._pos += n
        self.count = max(self.count, self._pos)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self._moved(len(data or b""))
        return data

    def read1(self, n: int = -1) -> bytes:
        read1 = getattr(self.stream, "read1", None)
        data = read1(n) if read1 is not None else self.stream.read(n)
        self._moved(len(data or b""))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int | None:
        n = self.stream.readinto(buffer)  # type: ignore[attr-defined]
        self._moved(n or 0)
        return n

    def write(self, data: bytes | bytearray | memoryview) -> int | None:
        n = self.stream.write(data)
        if n is not None:
            self._moved(n)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        before = self.stream.tell()
        after = self.stream.seek(offset, whence)
        self._pos += after - before
        return after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
