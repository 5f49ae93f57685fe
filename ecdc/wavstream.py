"""Audio that streams: block sources for compression and a WAV writer for decompression
(the other output formats, and which one an output gets, are :mod:`ecdc.outputformats`).

Compression reads its input a block at a time so memory does not grow with the input:
files through ``soundfile.SoundFile.blocks`` (any format libsndfile reads, seekable),
pipes through :class:`WavStreamReader`, which parses a WAV header from a non-seekable
stream (the sizes may be unknown, as ffmpeg and sox write them to pipes) and hands out
samples as they arrive. Only WAV streams incrementally from a pipe; anything else on
stdin (flac, ogg, ...) is read whole into memory and decoded from there, because
libsndfile needs to seek in those formats.

Headerless PCM (``compress --raw``) streams through :class:`RawPcmSource`, files and
pipes alike, with the WAV reader's sample conversion.

Decompression writes WAV and raw through :class:`WavStreamWriter`: 16 or 24-bit or float
samples, a header that goes out first with the sizes marked unknown, so a reader
downstream can start at once; on a seekable output the sizes are patched in at the end
(as RF64 past 4 GiB).

Audio is ``[channels, samples]`` float32 throughout, as in :mod:`ecdc.audio`. Integer
samples are converted exactly as libsndfile converts them, so a WAV streamed through a
pipe gives the same codes as the same file read from disk.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile

from . import audio, audiotags
from .errors import AudioError
from .messages import first_line
from .streams import write_all

__all__ = [
    "AudioSource",
    "ArraySource",
    "RAW_INPUT_FORMATS",
    "RawInput",
    "RawPcmSource",
    "SoundFileSource",
    "WavStreamReader",
    "WavStreamWriter",
    "open_audio_file",
    "open_audio_stream",
]

#: Frames per block read from files (about 1.4 s at 48 kHz).
BLOCK_FRAMES = 65536

_UNKNOWN_32 = 0xFFFFFFFF
#: Largest RIFF size (file size - 8) a WavStreamWriter writes as plain RIFF; a larger
#: file is rewritten as RF64 at close. A module constant so tests need not write 4 GiB.
RF64_THRESHOLD = _UNKNOWN_32
# The ds64 chunk without a table (riff size, data size, sample count: u64; table
# length: u32) and where it goes: right after RIFF/WAVE, in the JUNK reserved for it.
_DS64_SIZE = 28
_DS64_OFFSET = 12
_TAG_PCM = 0x0001
_TAG_FLOAT = 0x0003
_TAG_EXTENSIBLE = audio.WAVE_FORMAT_EXTENSIBLE
# The tail of every WAVE_FORMAT_EXTENSIBLE sub-format GUID; its first 2 bytes are the tag.
_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
# Chunks before 'data' larger than this are refused (a corrupt size, not metadata).
_MAX_SKIP = 1 << 30
# Largest fmt/ds64 chunk parsed into memory.
_MAX_FMT = 1 << 16


class AudioSource:
    """Audio that arrives in blocks: rate and channel count up front, samples as they come.

    ``frames`` is the length when the source knows it (a file), None for a stream.
    """

    sample_rate: int
    channels: int
    frames: int | None = None
    #: The input's tags (title, artist, ...; cleaned by :mod:`ecdc.audiotags`); never mutated.
    tags: Mapping[str, str] = {}
    #: The WAV channel mask (WAVE_FORMAT_EXTENSIBLE) when the input has one, else None: the
    #: default layout for the channel count (:func:`ecdc.audio.channel_layout`).
    channel_mask: int | None = None
    _owned: BinaryIO | None = None  # a file this source opened and must close

    def blocks(self) -> Iterator[np.ndarray]:
        """Yield ``[channels, n]`` float32 blocks (n > 0) until the input ends."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the underlying file (not stdin)."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> AudioSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArraySource(AudioSource):
    """In-memory audio as a source, cut into blocks like a file would be."""

    frames: int  # always known

    def __init__(self, wav: np.ndarray, sample_rate: int, block_frames: int = BLOCK_FRAMES):
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim == 1:
            wav = wav[None]
        if wav.ndim != 2:
            raise ValueError(f"audio must be [channels, samples], got shape {wav.shape}")
        self.wav = wav
        self.sample_rate = int(sample_rate)
        self.channels = wav.shape[0]
        self.frames = wav.shape[1]
        self._block = max(1, int(block_frames))

    def blocks(self) -> Iterator[np.ndarray]:
        for start in range(0, self.frames, self._block):
            yield self.wav[:, start:start + self._block]


#: How libsndfile (and soundfile, for a name ending .raw) say that a file has no header they know.
_NOT_RECOGNISED = ("Format not recognised", "samplerate must be specified", "channels must be specified")


class SoundFileSource(AudioSource):
    """A file (or seekable file object) read block by block through libsndfile."""

    def __init__(self, source, block_frames: int = BLOCK_FRAMES):
        try:
            self._sf = soundfile.SoundFile(source)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            # libsndfile's reason, without a preamble naming the file object (or the format, if known).
            reason = audio._soundfile_reason(exc)
            if reason.startswith(_NOT_RECOGNISED):  # no header: perhaps headerless PCM
                reason += audio.RAW_HINT
            raise audio.unreadable_error(source, reason) from None
        except OSError as exc:
            raise audio.input_error(exc) from None
        try:
            self.sample_rate = audio.check_sample_rate(self._sf.samplerate)
        except AudioError:
            self._sf.close()
            raise
        self.channels = int(self._sf.channels)
        frames = self._sf.frames
        # libsndfile reports an unknown length as a huge number.
        self.frames = int(frames) if 0 <= frames < 2**62 else None
        self._block = max(1, int(block_frames))
        self._source = source  # to name its format if reading fails
        self.tags = audiotags.read_soundfile_tags(self._sf)
        if self._sf.format in ("WAV", "WAVEX", "RF64"):
            self.channel_mask = audio.read_channel_mask(source)

    def blocks(self) -> Iterator[np.ndarray]:
        # read() in a loop rather than SoundFile.blocks(): blocks() refuses files libsndfile
        # cannot seek in (e.g. G.721 ADPCM in a WAV) with a ValueError, read() does not.
        try:
            while True:
                block = self._sf.read(self._block, dtype="float32", always_2d=True)
                if not block.shape[0]:
                    return
                yield np.ascontiguousarray(block.T)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            # e.g. a FLAC of unknown length from a pipe, which opens but cannot be read
            raise audio.unreadable_error(self._source, first_line(exc)) from None

    def close(self) -> None:
        self._sf.close()
        super().close()


# --------------------------------------------------------------------------- reading WAV streams


class _UnsupportedWav(AudioError):
    """A well-formed WAV header with an encoding this reader does not decode (e.g. ADPCM)."""

    consumed: bytes = b""


class WavStreamReader(AudioSource):
    """Parses a WAV header from a stream that cannot seek and yields samples as they arrive.

    Handles RIFF (little-endian), RIFX (big-endian) and RF64 files holding integer PCM of
    8/16/24/32 bits or IEEE float of 32/64 bits, plain or WAVE_FORMAT_EXTENSIBLE, with
    chunks it does not know (LIST, fact, JUNK, ...) skipped before ``data``. Sizes of
    0xFFFFFFFF (or 0 with an unknown RIFF size) mean "read to the end of the stream".
    A stream that ends before its declared size ends the audio there, and a trailing
    partial sample frame is dropped, as libsndfile does for files; a stream that ends
    inside the header is an error.

    ``prefix`` holds bytes already read from the stream (e.g. to sniff the format).
    """

    def __init__(self, fileobj: BinaryIO, prefix: bytes = b"", block_frames: int = BLOCK_FRAMES):
        self._f = fileobj
        self._pending = bytearray(prefix)
        self._consumed = bytearray()  # header bytes, kept so a caller can fall back
        self._recording = True
        self._block = max(1, int(block_frames))
        try:
            self._parse_header()
        except _UnsupportedWav as exc:
            exc.consumed = bytes(self._consumed) + bytes(self._pending)
            raise
        self._recording = False
        self._consumed = bytearray()

    # -- raw reading

    def _read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes: what is already there, waiting only if nothing is (pipes)."""
        if self._pending:
            data = bytes(self._pending[:n])
            del self._pending[:n]
        else:
            read1 = getattr(self._f, "read1", None)
            data = read1(n) if read1 is not None else self._f.read(n)
            data = data or b""
        if self._recording:
            self._consumed += data
        return data

    def _read_exactly(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            piece = self._read_some(min(n - got, 1 << 20))
            if not piece:
                raise AudioError(f"WAV stream truncated in its {what} ({got} of {n} bytes)")
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def _skip(self, n: int, what: str) -> None:
        while n > 0:
            piece = self._read_some(min(n, 1 << 16))
            if not piece:
                raise AudioError(f"WAV stream truncated in its {what}")
            n -= len(piece)

    # -- header

    def _parse_header(self) -> None:
        riff = self._read_exactly(12, "RIFF header")
        magic, form = riff[:4], riff[8:12]
        if magic not in (b"RIFF", b"RIFX", b"RF64") or form != b"WAVE":
            raise AudioError("not a WAV stream (no RIFF/WAVE header)")
        self._endian = ">" if magic == b"RIFX" else "<"
        (riff_size,) = struct.unpack(self._endian + "I", riff[4:8])
        size_known = riff_size not in (0, _UNKNOWN_32)
        ds64_data: int | None = None
        fmt: bytes | None = None
        while True:
            head = self._read_exactly(8, "chunk list (no 'data' chunk)")
            cid = head[:4]
            (size,) = struct.unpack(self._endian + "I", head[4:])
            if cid == b"data":
                break
            if cid in (b"fmt ", b"ds64"):
                if size > _MAX_FMT:
                    raise AudioError(f"corrupt WAV stream: {cid.decode().strip()} chunk of {size} bytes")
                body = self._read_exactly(size, f"{cid.decode().strip()} chunk")
                self._skip(size & 1, "chunk padding")
                if cid == b"fmt ":
                    fmt = body
                elif magic == b"RF64" and len(body) >= 24:
                    _riff64, data64, _count = struct.unpack_from("<QQQ", body)
                    ds64_data = data64
                continue
            if size == _UNKNOWN_32 or size > _MAX_SKIP:
                raise AudioError(f"corrupt WAV stream: chunk {cid!r} before 'data' claims {size} bytes")
            if cid == b"LIST" and size <= audiotags.MAX_WAV_LIST and not self.tags:
                self.tags = audiotags.parse_wav_info(self._read_exactly(size, "LIST chunk"))
                self._skip(size & 1, "chunk padding")
                continue
            self._skip(size + (size & 1), f"{cid!r} chunk")
        if fmt is None:
            raise AudioError("corrupt WAV stream: 'data' comes before any 'fmt ' chunk")
        self._parse_fmt(fmt)
        if magic == b"RF64" and size == _UNKNOWN_32 and ds64_data not in (None, 0, 2**64 - 1):
            size, unknown = ds64_data, False
        else:
            unknown = size == _UNKNOWN_32 or (size == 0 and not size_known)
        self._remaining: int | None = None if unknown else size
        self.frames = None if unknown else size // self._frame_bytes

    def _parse_fmt(self, fmt: bytes) -> None:
        if len(fmt) < 16:
            raise AudioError(f"corrupt WAV stream: 'fmt ' chunk of {len(fmt)} bytes")
        tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from(self._endian + "HHIIHH", fmt)
        if tag == _TAG_EXTENSIBLE:
            if len(fmt) < 40:
                raise AudioError("corrupt WAV stream: WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is too short")
            guid = fmt[24:40]
            (tag,) = struct.unpack_from(self._endian + "H", guid)
            if guid[2:] != _GUID_TAIL:
                raise _UnsupportedWav("WAV stream uses an unknown WAVE_FORMAT_EXTENSIBLE sub-format")
        if channels < 1 or rate < 1:
            raise AudioError(f"corrupt WAV stream: {channels} channels at {rate} Hz")
        kinds = {(_TAG_PCM, 8): "u1", (_TAG_PCM, 16): "i2", (_TAG_PCM, 24): "i3", (_TAG_PCM, 32): "i4",
                 (_TAG_FLOAT, 32): "f4", (_TAG_FLOAT, 64): "f8"}
        kind = kinds.get((tag, bits))
        if kind is None:
            raise _UnsupportedWav(f"WAV stream encoding (format 0x{tag:04x}, {bits} bits) cannot be streamed")
        if block_align != channels * bits // 8:
            raise _UnsupportedWav(f"WAV stream block alignment {block_align} does not match "
                                  f"{channels} channels of {bits} bits")
        self._kind = kind
        self.channel_mask = audio.fmt_channel_mask(fmt, self._endian)
        self.channels = audio.check_channels(channels)
        self.sample_rate = audio.check_sample_rate(rate)
        self.bits = bits
        self._frame_bytes = block_align
        self.subtype = {"u1": "PCM_U8", "i2": "PCM_16", "i3": "PCM_24", "i4": "PCM_32",
                        "f4": "FLOAT", "f8": "DOUBLE"}[kind]

    # -- samples

    def read(self, max_frames: int) -> np.ndarray:
        """Up to ``max_frames`` frames as ``[C, n]`` float32; waits only until some arrive.

        Returns an empty array at the end of the audio.
        """
        fb = self._frame_bytes
        want = max(1, int(max_frames)) * fb
        if self._remaining is not None:
            want = min(want, self._remaining)
        buf = bytearray()
        while want > 0 and len(buf) < fb:
            piece = self._read_some(want - len(buf))
            if not piece:
                break  # end of stream: a partial frame left in buf is dropped
            buf += piece
        usable = len(buf) - len(buf) % fb
        if usable < len(buf):
            # Keep the partial frame for the next call (more may arrive).
            self._pending[:0] = buf[usable:]
            if not usable:
                return np.zeros((self.channels, 0), dtype=np.float32)
        if self._remaining is not None:
            self._remaining -= usable
        return self._convert(bytes(buf[:usable]))

    def blocks(self) -> Iterator[np.ndarray]:
        while True:
            block = self.read(self._block)
            if not block.shape[1]:
                return
            yield block

    def _convert(self, data: bytes) -> np.ndarray:
        e, c = self._endian, self.channels
        kind = self._kind
        if kind == "u1":
            ints = np.frombuffer(data, dtype=np.uint8).astype(np.int32) - 128
            out = ints.astype(np.float32) * np.float32(1 / 128)
        elif kind == "i3":
            raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
            lo, hi = (0, 2) if e == "<" else (2, 0)
            ints = (raw[:, lo] << 8) | (raw[:, 1] << 16) | (raw[:, hi] << 24)  # 24 bits, sign on top
            out = ints.astype(np.float32) * np.float32(2.0 ** -31)
        elif kind in ("i2", "i4"):
            ints = np.frombuffer(data, dtype=e + kind)
            scale = np.float32(2.0 ** -15 if kind == "i2" else 2.0 ** -31)
            out = ints.astype(np.float32) * scale
        else:
            out = np.frombuffer(data, dtype=e + kind).astype(np.float32)
        return np.ascontiguousarray(out.reshape(-1, c).T)


def open_audio_file(path: str, block_frames: int = BLOCK_FRAMES, raw: RawInput | None = None) -> AudioSource:
    """A file on disk, read block by block (any format libsndfile reads, or headerless PCM
    as ``raw`` describes it).

    Refused up front like :func:`ecdc.audio.read_audio` refuses it (missing, a directory,
    empty); a named pipe or device is read like stdin (:func:`open_audio_stream`). A file
    libsndfile cannot open by name (not UTF-8, a path over 1 KiB) is opened by Python and
    handed over as a file object (:func:`ecdc.audio.libsndfile_takes_name`).
    """
    st = audio.check_input_path(path)
    if raw is not None:
        return _raw_file(path, raw, st, block_frames)
    if stat.S_ISREG(st.st_mode) and audio.libsndfile_takes_name(path):
        return SoundFileSource(path, block_frames)
    try:
        f = open(path, "rb")  # a FIFO waits here for a writer, as cat does
    except OSError as exc:
        raise audio.input_error(exc) from None
    try:
        if stat.S_ISREG(st.st_mode):
            source: AudioSource = SoundFileSource(f, block_frames)
        else:
            source = open_audio_stream(f, block_frames)
    except BaseException:
        f.close()
        raise
    source._owned = f
    return source


def open_audio_stream(stream: BinaryIO, block_frames: int = BLOCK_FRAMES,
                      raw: RawInput | None = None) -> AudioSource:
    """Audio from a stream such as stdin: WAV (and headerless PCM, with ``raw``)
    incrementally, anything else read whole.

    libsndfile must seek to decode most formats, so a non-WAV stream (or a WAV encoding
    this reader does not decode, e.g. ADPCM) is read into memory first and decoded there:
    sniffed, and only up to :data:`ecdc.audio.MAX_BUFFERED_INPUT` (:func:`ecdc.audio.buffer_stream`).
    """
    if raw is not None:
        return RawPcmSource(stream, raw, block_frames=block_frames)
    head = audio.read_upto(stream, 12)
    if not head:
        raise AudioError("empty input")
    if audio.is_wav_head(head):
        try:
            return WavStreamReader(stream, prefix=head, block_frames=block_frames)
        except _UnsupportedWav as exc:
            head = exc.consumed  # what the parse read, so libsndfile sees the whole file
    return _whole_stream(stream, head, block_frames)


def _raw_file(path: str, raw: RawInput, st: os.stat_result, block_frames: int) -> AudioSource:
    """A file (or FIFO) of headerless PCM; its length in frames is known when it is a regular file."""
    try:
        f = open(path, "rb")  # a FIFO waits here for a writer, as cat does
    except OSError as exc:
        raise audio.input_error(exc) from None
    try:
        source = RawPcmSource(f, raw, st.st_size if stat.S_ISREG(st.st_mode) else None, block_frames)
    except BaseException:
        f.close()
        raise
    source._owned = f
    return source


def _whole_stream(stream: BinaryIO, head: bytes, block_frames: int) -> AudioSource:
    return SoundFileSource(audio.buffer_stream(stream, head), block_frames)


# --------------------------------------------------------------------------- reading raw PCM

#: ``--raw-format`` names (as ffmpeg's ``-f``), and how their samples are stored.
RAW_INPUT_FORMATS = {"s16le": "i2", "s24le": "i3", "f32le": "f4"}


@dataclass(frozen=True)
class RawInput:
    """Headerless PCM input, described as opusenc's ``--raw`` options describe it (and with
    its defaults: 48 kHz, stereo, 16-bit little-endian)."""

    sample_rate: int = 48000
    channels: int = 2
    format: str = "s16le"  #: one of :data:`RAW_INPUT_FORMATS`


class RawPcmSource(WavStreamReader):
    """Headerless little-endian PCM from a file or a stream, as it arrives.

    A :class:`WavStreamReader` whose header is ``raw`` rather than parsed: the same
    incremental reads and the same sample conversion, so raw samples give exactly the
    codes the same samples in a WAV file give. A trailing partial frame is dropped.
    ``size`` is the input's length in bytes, when known (a regular file).
    """

    def __init__(self, fileobj: BinaryIO, raw: RawInput, size: int | None = None,
                 block_frames: int = BLOCK_FRAMES):
        kind = RAW_INPUT_FORMATS.get(raw.format)
        if kind is None:
            raise AudioError(f"unknown raw format {raw.format!r}; use {', '.join(RAW_INPUT_FORMATS)}")
        if raw.channels < 1:
            raise AudioError(f"invalid raw channel count {raw.channels}")
        self._f = fileobj
        self._pending = bytearray()
        self._consumed = bytearray()
        self._recording = False
        self._block = max(1, int(block_frames))
        self._endian = "<"
        self._kind = kind
        self.channels = audio.check_channels(raw.channels)
        self.sample_rate = audio.check_sample_rate(raw.sample_rate)
        self.bits = 24 if kind == "i3" else 8 * int(kind[1])
        self._frame_bytes = self.channels * self.bits // 8
        self.subtype = {"i2": "PCM_16", "i3": "PCM_24", "f4": "FLOAT"}[kind]
        self._remaining = None
        self.frames = None if size is None else size // self._frame_bytes


# --------------------------------------------------------------------------- writing WAV streams


class WavStreamWriter:
    """Writes PCM as WAV (or headerless with ``raw=True``) block by block: 16 or 24-bit
    integers or 32-bit float (``subtype`` ``PCM_16``, ``PCM_24``, ``FLOAT``), little-endian.

    The header goes out first with RIFF and data sizes of 0xFFFFFFFF ("unknown", which
    sox and ffmpeg accept on a pipe); :meth:`close` patches the real sizes in when the
    output can seek (a regular file). On a seekable output the header also reserves a
    ``JUNK`` chunk of 28 bytes after RIFF/WAVE, as EBU Tech 3306 (RF64) suggests: if the
    file grows past 4 GiB (RIFF size over :data:`RF64_THRESHOLD`), :meth:`close` turns it
    into a ``ds64`` chunk and the header into RF64, since 32-bit sizes cannot hold the
    length and 0xFFFFFFFF would be misread as a 4 GiB file. On a pipe there is nothing
    to reserve: the sizes stay 0xFFFFFFFF (the convention for "unknown" there, read to
    the end of the stream). Integer samples are clipped so peaks saturate, and converted
    exactly as libsndfile converts float to PCM; float samples are written as they are
    (NaN as 0), as opusdec's ``--float`` does.
    """

    def __init__(self, fileobj: BinaryIO, sample_rate: int, channels: int, raw: bool = False,
                 subtype: str = "PCM_16", tags: Mapping[str, str] | None = None, channel_mask: int = 0):
        if channels < 1 or sample_rate < 1:
            raise AudioError(f"invalid output format: {channels} channels at {sample_rate} Hz")
        if subtype not in _STREAM_SUBTYPES:
            raise ValueError(f"WavStreamWriter writes {', '.join(_STREAM_SUBTYPES)}, not {subtype}")
        self._f = fileobj
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.raw = raw
        self.subtype = subtype
        self._sample_bytes = _STREAM_SUBTYPES[subtype]
        self.frames_written = 0
        self._start: int | None = None
        self._closed = False
        if raw:
            return
        try:
            if fileobj.seekable():
                self._start = fileobj.tell()
        except (AttributeError, OSError, ValueError):
            self._start = None
        header, self._riff_offset, self._data_offset = _wav_header(
            self.sample_rate, self.channels, reserve_ds64=self._start is not None, subtype=subtype,
            info=audiotags.wav_info_chunk(tags or {}), channel_mask=channel_mask)
        self._write(header)

    def write(self, block: np.ndarray) -> None:
        """Append ``[channels, n]`` float audio."""
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[0] != self.channels:
            raise ValueError(f"expected [{self.channels}, n] audio, got shape {block.shape}")
        if not block.shape[1]:
            return
        self._write(encode_samples(block, self.subtype))
        self.frames_written += block.shape[1]

    def close(self) -> None:
        """Patch the sizes where possible and flush; the file object stays open."""
        if self._closed:
            return
        self._closed = True
        if not self.raw and self._start is not None:
            data_bytes = self.frames_written * self.channels * self._sample_bytes
            riff = self._data_offset + 4 + data_bytes - 8
            end = self._f.tell()
            if riff <= RF64_THRESHOLD:
                self._f.seek(self._start + self._riff_offset)
                self._write(struct.pack("<I", riff))
                self._f.seek(self._start + self._data_offset)
                self._write(struct.pack("<I", data_bytes))
            else:
                # RF64: the 32-bit sizes say "see ds64", which replaces the reserved JUNK.
                self._f.seek(self._start)
                self._write(b"RF64" + struct.pack("<I", _UNKNOWN_32))
                self._f.seek(self._start + _DS64_OFFSET)
                self._write(b"ds64" + struct.pack("<IQQQI", _DS64_SIZE, riff, data_bytes,
                                                  self.frames_written, 0))
                self._f.seek(self._start + self._data_offset)
                self._write(struct.pack("<I", _UNKNOWN_32))
            self._f.seek(end)
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            flush()

    def _write(self, data: bytes) -> None:
        write_all(self._f, data)


#: What :class:`WavStreamWriter` writes: libsndfile's subtype names, and bytes per sample.
_STREAM_SUBTYPES = {"PCM_16": 2, "PCM_24": 3, "FLOAT": 4}


def to_pcm16(wav: np.ndarray) -> np.ndarray:
    """float -> int16 exactly as libsndfile writes PCM_16 (clipped to +-1, never wrapped)."""
    return _to_pcm(wav, 16).astype("<i2")


def _to_pcm(wav: np.ndarray, bits: int) -> np.ndarray:
    """float -> ``bits``-bit integers (in int64) as libsndfile converts them: scaled to 32
    bits, rounded, then shifted down; clipped first, so full scale saturates."""
    top = np.float32((2 ** (bits - 1) - 1) / 2 ** (bits - 1))
    clipped = np.clip(np.asarray(wav, dtype=np.float32), -1.0, top)
    return np.rint(clipped.astype(np.float64) * 2.0 ** 31).astype(np.int64) >> (32 - bits)


def encode_samples(block: np.ndarray, subtype: str) -> bytes:
    """``[C, n]`` float audio as interleaved little-endian ``PCM_16``, ``PCM_24`` or ``FLOAT`` bytes."""
    if subtype == "PCM_16":
        return to_pcm16(block).T.tobytes()
    if subtype == "PCM_24":
        ints = _to_pcm(block, 24).T.astype("<i4")
        return np.ascontiguousarray(ints).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    if subtype == "FLOAT":
        finite = np.nan_to_num(np.asarray(block, dtype=np.float32), nan=0.0)
        return np.ascontiguousarray(finite.T, dtype="<f4").tobytes()
    raise ValueError(f"no stream encoding for {subtype}")


def _wav_header(rate: int, channels: int, reserve_ds64: bool = False,
                subtype: str = "PCM_16", info: bytes = b"", channel_mask: int = 0) -> tuple[bytes, int, int]:
    """A header for ``subtype`` samples with unknown sizes; returns it with the offsets of
    both size fields.

    ``reserve_ds64`` puts a 28-byte JUNK chunk (room for an RF64 ds64 chunk) first;
    ``info`` (a LIST/INFO chunk of tags) goes just before ``data``. ``channel_mask`` (the
    speakers, 0: the default for the count) is written in a WAVE_FORMAT_EXTENSIBLE header,
    which is used for more than two channels (as Microsoft asks) and wherever the mask is
    not plain mono or stereo.
    """
    sample_bytes = _STREAM_SUBTYPES[subtype]
    tag = _TAG_FLOAT if subtype == "FLOAT" else _TAG_PCM
    block_align = channels * sample_bytes
    bits = 8 * sample_bytes
    common = struct.pack("<HIIHH", channels, rate, rate * block_align, block_align, bits)
    mask = int(channel_mask) or audio.default_channel_mask(channels)
    if channels <= 2 and mask == audio.default_channel_mask(channels):
        fmt = struct.pack("<H", tag) + common
    else:
        guid = struct.pack("<H", tag) + _GUID_TAIL
        fmt = struct.pack("<H", _TAG_EXTENSIBLE) + common + struct.pack("<HHI", 22, bits, mask) + guid
    junk = b"JUNK" + struct.pack("<I", _DS64_SIZE) + bytes(_DS64_SIZE) if reserve_ds64 else b""
    header = (b"RIFF" + struct.pack("<I", _UNKNOWN_32) + b"WAVE" + junk
              + b"fmt " + struct.pack("<I", len(fmt)) + fmt + info
              + b"data" + struct.pack("<I", _UNKNOWN_32))
    return header, 4, len(header) - 4
