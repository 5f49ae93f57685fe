"""The input as the readers see it: bounded reads from a file object, and the position.

Only ``read`` is needed, so pipes work; ``seekable``/``seek``/``tell`` are used where
the file object has them, to learn its size and to give back bytes read ahead.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from ..errors import TruncatedError

# Reads from the file object are split into pieces of at most this size, so a
# lying length never causes a large allocation before EOF is seen.
_READ_PIECE = 1 << 20


class ByteSource:
    """A binary file object read forward in bounded pieces, counting what it consumed."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.file = fileobj
        #: Bytes consumed from the file object so far (less any given back by :meth:`unread`
        #: or :meth:`push_back`).
        self.pos = 0
        self._back = b""  # bytes pushed back, served before the file's

    def push_back(self, data: bytes) -> None:
        """Make ``data`` (the bytes just read) the next to be read again; pipes too.

        The readers peek at the chunk after the header this way (a tags chunk or not).
        """
        self._back = bytes(data) + self._back
        self.pos -= len(data)

    def read_upto(self, n: int) -> bytes:
        """Read up to ``n`` bytes, fewer only at EOF, in bounded pieces."""
        parts = []
        got = 0
        if self._back and n > 0:
            parts.append(self._back[:n])
            got = len(parts[0])
            self._back = self._back[got:]
        while got < n:
            piece = self.file.read(min(n - got, _READ_PIECE))
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def read_exactly(self, n: int, what: str) -> bytes:
        """Read ``n`` bytes, or raise TruncatedError naming ``what`` and where it started."""
        start = self.pos
        data = self.read_upto(n)
        if len(data) < n:
            raise TruncatedError(
                f".ecdc stream truncated in {what}: {n} bytes needed from byte {start}, "
                f"only {len(data)} left"
            )
        return data

    def unread(self, n: int) -> None:
        """Give back the last ``n`` bytes read, where the file can seek; else keep them read."""
        if self._back:
            return  # only after a push_back not yet read again: keep it simple, keep them read
        try:
            if self.file.seekable():
                self.file.seek(-n, io.SEEK_CUR)
                self.pos -= n
        except (AttributeError, OSError, ValueError):
            pass

    def size(self) -> int | None:
        """Bytes in the whole stream where the file object can tell (a file), else None."""
        try:
            if not self.file.seekable():
                return None
            here = self.file.tell()
            end = self.file.seek(0, io.SEEK_END)
            self.file.seek(here)
        except (AttributeError, OSError, ValueError):
            return None
        return self.pos + len(self._back) + max(end - here, 0)
