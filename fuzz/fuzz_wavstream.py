#!/usr/bin/env python3
"""Coverage-guided fuzzing of the WAV stream reader (what ``ecdc compress -`` reads) with atheris.

Each input is fed, as a pipe would feed it (no seeking, bytes arriving in uneven pieces),
to ``open_audio_stream`` and every block is read. Anything other than an ``EcdcError`` is
a crash, and so is a broken invariant (raised as AssertionError): blocks are ``[channels,
n > 0]`` float32, integer PCM stays within [-1, 1], the WAV reader never hands out more
samples than the input holds, and no input makes Python-visible memory (numpy arrays,
bytes; traced with tracemalloc) peak above a small multiple of its size.

atheris is only needed to fuzz (``python fuzz/fuzz_wavstream.py DIR ...``, see
fuzz/README.md); without it the module imports, so tests/test_fuzz_targets.py replays the
seed corpus through :func:`TestOneInput` in the normal test suite.
"""

from __future__ import annotations

import io
import sys
import tracemalloc
import types
from pathlib import Path
from typing import Any

import numpy as np

# Load ecdc.wavstream without ecdc/__init__.py, which imports torch: reading audio must
# not need it, and instrumenting torch would be slow and pointless.
_ROOT = Path(__file__).resolve().parent.parent
if "ecdc" not in sys.modules:
    _pkg = types.ModuleType("ecdc")
    _pkg.__path__ = [str(_ROOT / "ecdc")]  # type: ignore[attr-defined]
    sys.modules["ecdc"] = _pkg

#: Seed corpus (written by make_corpus.py).
CORPUS = _ROOT / "fuzz" / "corpus_wavstream"
#: Memory an input may make Python allocate: a few blocks of a typical file whatever its
#: size (libsndfile decodes compressed formats into 65536-frame blocks), plus a multiple
#: of its size (sample conversion makes a few float32 copies of a block).
MEMORY_FLOOR = 8 << 20
MEMORY_FACTOR = 32
#: Sizes in which the fake pipe hands out bytes, in turn: partial frames and headers.
_PIECES = (1, 7, 4096, 3, 65536, 29)

wavstream: Any = None
EcdcError: Any = Exception


def _import_targets() -> None:
    """Import what is fuzzed (under atheris' instrumentation when fuzzing)."""
    global wavstream, EcdcError
    from ecdc import wavstream as module
    from ecdc.errors import EcdcError as error

    wavstream, EcdcError = module, error


class Pipe(io.RawIOBase):
    """``data`` as a pipe delivers it: not seekable, and reads return uneven pieces."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._pos = 0
        self._turn = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: Any) -> int:
        piece = _PIECES[self._turn % len(_PIECES)]
        self._turn += 1
        n = min(len(buffer), piece, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def read1(self, n: int = -1) -> bytes:
        return self.read(n if n >= 0 else 1 << 16)


def _read_all(data: bytes) -> int | None:
    """Read every block of ``data``; the frame count, or None when refused (EcdcError)."""
    try:
        source = wavstream.open_audio_stream(Pipe(data))
    except EcdcError:
        return None
    frames = 0
    try:
        is_wav = isinstance(source, wavstream.WavStreamReader)
        integer = is_wav and source.subtype not in ("FLOAT", "DOUBLE")
        assert isinstance(source.channels, int) and source.channels >= 1, source.channels
        assert isinstance(source.sample_rate, int) and source.sample_rate >= 1, source.sample_rate
        for block in source.blocks():
            assert isinstance(block, np.ndarray) and block.dtype == np.float32, type(block)
            assert block.ndim == 2 and block.shape[0] == source.channels and block.shape[1] > 0, block.shape
            if integer and block.size:
                assert float(np.abs(block).max()) <= 1.0
            frames += block.shape[1]
        if is_wav:
            # Every frame came from the input: a stream cannot invent samples.
            assert frames * source._frame_bytes <= len(data), (frames, source._frame_bytes, len(data))
    except EcdcError:
        return None
    finally:
        source.close()
    return frames


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    if wavstream is None:
        _import_targets()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        _read_all(data)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        if started:
            tracemalloc.stop()
    bound = max(MEMORY_FLOOR, MEMORY_FACTOR * len(data))
    assert peak <= bound, f"{len(data)} bytes of input made Python allocate {peak} bytes at once"


def main() -> None:
    import atheris

    with atheris.instrument_imports(include=["ecdc"]):
        _import_targets()
    tracemalloc.start()  # once: TestOneInput then only resets the peak
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
