"""Compress and decompress audio: the glue between model, audio conversion and container.

The model works at its own rate and channel count on torch tensors; the container holds
numpy codes; this module converts between the user's audio and both, and records in
the header what is needed to give the user back what went in.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import io
import itertools
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import soxr
import torch

from . import audio
from .container import CodeChunk, EcdcHeader, EcdcReader, EcdcWriter, Gap, StereoMode
from .errors import AudioError, FormatError, ModelError, OutputError
from .models.encodec import EncodecModel, EncodedSegment
from .models.streaming import StreamingDecoder, StreamingEncoder
from .wavstream import ArraySource, AudioSource, WavStreamWriter, open_audio_file
from . import weights
from .weights import load_weights

STEREO_CHOICES = ("downmix", "dual")
_SILENCE_BLOCK = 1 << 16  # samples of silence per block for a salvaged gap (a gap may be days long)
# Most samples x channels in one block of decoded audio, before and after resampling and
# channel conversion: a header may ask for 1024 channels at 1 MHz (41.7 times the model's
# rate), so blocks are sized from the output format, not the input (4 MiB of float32).
_BLOCK_ELEMENTS = 1 << 20
# An unsegmented chunk is pushed to the decoder this many frames at a time: a CRC-valid
# 16 MiB chunk can hold millions of frames, which decoded at once would be gigabytes.
_PUSH_FRAMES = 1024
UNKNOWN_FINGERPRINT = bytes(16)


def resolve_device(device: str = "cpu") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("CUDA was requested but no CUDA device is available (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


@dataclass
class EncodedAudio:
    """Everything a .ecdc file holds, in memory."""

    header: EcdcHeader
    chunks: List[CodeChunk] = field(default_factory=list)
    num_samples: int = 0
    #: the input's length at header.original_sample_rate (None: unknown)
    original_samples: Optional[int] = None

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write(buf)
        return buf.getvalue()

    def write(self, fileobj: BinaryIO) -> None:
        writer = EcdcWriter(fileobj, self.header)
        for chunk in self.chunks:
            writer.write_chunk(chunk)
        writer.finish(self.num_samples, self.original_samples)

    @classmethod
    def read(cls, fileobj: BinaryIO) -> "EncodedAudio":
        reader = EcdcReader(fileobj)
        chunks = list(reader)
        total = reader.total_samples
        if total is None:
            total = reader.header.num_samples if reader.header.num_samples is not None else 0
        return cls(reader.header, chunks, int(total), reader.original_samples)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncodedAudio":
        return cls.read(io.BytesIO(data))

    @property
    def duration(self) -> float:
        return self.num_samples / self.header.sample_rate


ProgressFn = Callable[[float], None]
"""Called with the seconds of audio just processed (an increment), for progress bars."""


@dataclass
class StreamResult:
    """What a streamed compression wrote: its header and the lengths its end marker holds."""

    header: EcdcHeader
    num_samples: int
    original_samples: int
    chunks: int

    @property
    def duration(self) -> float:
        return self.original_samples / self.header.original_sample_rate


@dataclass
class _Totals:
    """Last item of :meth:`Codec._encode_events`: the lengths for the end marker."""

    num_samples: int
    original_samples: int


class Codec:
    """A loaded model plus the conversions that turn any audio into its codes and back.

    Everything streams: audio is read, mixed, resampled (streaming libsoxr) and encoded a
    block at a time, and decoded the same way, so memory does not grow with the input.
    The in-memory :meth:`encode`/:meth:`decode` run the same pipeline, so they give
    exactly the codes and samples that :meth:`compress_stream`/:meth:`decode_blocks` do.
    """

    def __init__(self, model: EncodecModel, fingerprint: bytes, device: Union[str, torch.device] = "cpu"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.fingerprint = fingerprint

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def bandwidths(self) -> Tuple[float, ...]:
        return tuple(self.model.bandwidths)

    # -- encoding -------------------------------------------------------------------

    def encode(self, wav: np.ndarray, sample_rate: int, bandwidth: float = 6.0,
               stereo: Optional[str] = None) -> EncodedAudio:
        """Encode ``[C, T]`` (or ``[T]``) float audio at any rate and channel count.

        ``stereo`` applies to mono models given multi-channel input: ``downmix`` (default)
        codes the mean, ``dual`` codes the first two channels (after mixing more down to
        two) separately at twice the bitrate.
        """
        source = ArraySource(wav, int(sample_rate))
        header: Optional[EcdcHeader] = None
        chunks: List[CodeChunk] = []
        totals = _Totals(0, 0)
        for item in self._encode_events(source, bandwidth, stereo):
            if isinstance(item, EcdcHeader):
                header = item
            elif isinstance(item, CodeChunk):
                chunks.append(item)
            else:
                totals = item
        # In memory the length is known, so the header carries it too.
        header = dataclasses.replace(header, num_samples=totals.num_samples)
        return EncodedAudio(header, chunks, totals.num_samples, totals.original_samples)

    def compress_stream(self, source: AudioSource, out: BinaryIO, bandwidth: float = 6.0,
                        stereo: Optional[str] = None, progress: Optional[ProgressFn] = None) -> StreamResult:
        """Encode ``source`` block by block into a .ecdc stream written to ``out``.

        The header goes out first (its sample count "unknown"; the end marker carries it)
        and every chunk is written and flushed as soon as its frames are coded, so ``out``
        can be a pipe that a reader consumes while the input is still arriving.
        """
        return _write_stream(self._encode_events(source, bandwidth, stereo, progress), out)

    def _encode_events(self, source: AudioSource, bandwidth: float, stereo: Optional[str],
                       progress: Optional[ProgressFn] = None) -> Iterator[Union[EcdcHeader, CodeChunk, _Totals]]:
        """The one encoding pipeline: yields the header, then code chunks, then the totals."""
        num_codebooks = self.model.num_codebooks(bandwidth)
        in_rate = int(source.sample_rate)
        audio.check_sample_rate(in_rate)  # the header can hold no other original rate
        mode, coded_channels = self._layout(source.channels, stereo)
        yield EcdcHeader(
            model_name=self.name,
            weights_fingerprint=self.fingerprint,
            sample_rate=self.sample_rate,
            channels=self.channels,
            stereo_mode=mode,
            bandwidth=float(bandwidth),
            num_codebooks=num_codebooks,
            bits_per_code=self.model.bits_per_code,
            hop_length=self.model.hop_length,
            segment_length=self.model.segment_length or 0,
            segment_stride=self.model.segment_stride or 0,
            has_scale=bool(self.model.config.normalize),
            num_samples=None,
            original_sample_rate=in_rate,
            original_channels=source.channels,
        )
        resampler = None
        if in_rate != self.sample_rate:
            resampler = soxr.ResampleStream(in_rate, self.sample_rate, coded_channels,
                                            dtype="float32", quality="HQ")
        encoder = None
        chunker = _Chunker(max(1, int(np.ceil(self.model.frame_rate))), self.model.segment_length is not None)
        original = total = 0

        def feed(coded: np.ndarray) -> Iterator[CodeChunk]:
            nonlocal encoder, total
            if not coded.shape[-1]:
                return
            total += coded.shape[-1]
            # DUAL codes each channel as its own batch item through the mono model.
            batch = coded[:, None, :] if mode == StereoMode.DUAL else coded[None]
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            with torch.inference_mode():
                if encoder is None:
                    encoder = StreamingEncoder(self.model, num_codebooks)
                segments = encoder.push(x)
            yield from chunker.add(segments)

        for block in source.blocks():
            if block.shape[0] != source.channels:
                raise AudioError(f"audio block has {block.shape[0]} channels, expected {source.channels}")
            audio.check_finite(block, in_rate, offset=original)
            original += block.shape[-1]
            coded = block if coded_channels == block.shape[0] else audio.to_channels(block, coded_channels)
            if resampler is not None:
                coded = _resample_chunk(resampler, coded, last=False)
            yield from feed(coded)
            if progress is not None:
                progress(block.shape[-1] / in_rate)
        if resampler is not None and original:
            yield from feed(_resample_chunk(resampler, np.zeros((coded_channels, 0), np.float32), last=True))
        if encoder is not None:
            with torch.inference_mode():
                segments = encoder.flush()
            yield from chunker.add(segments)
        yield from chunker.flush()
        yield _Totals(total, original)

    # -- decoding -------------------------------------------------------------------

    def output_format(self, header: EcdcHeader, sample_rate: Optional[int] = None,
                      channels: Optional[int] = None) -> Tuple[int, int]:
        """(rate, channels) a decode gives: the original input's unless overridden."""
        rate = int(sample_rate or header.original_sample_rate or header.sample_rate)
        chans = int(channels or header.original_channels or header.channels)
        return rate, chans

    def decode(self, encoded: EncodedAudio, sample_rate: Optional[int] = None,
               channels: Optional[int] = None) -> Tuple[np.ndarray, int]:
        """Decode to ``[C, T]`` float32 at the original rate and channel count (or those given)."""
        rate, chans = self.output_format(encoded.header, sample_rate, channels)
        blocks = list(self.decode_blocks(encoded, sample_rate, channels))
        if not blocks:
            return np.zeros((chans, 0), dtype=np.float32), rate
        return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32), rate

    def decode_blocks(self, encoded: Union[EcdcReader, EncodedAudio], sample_rate: Optional[int] = None,
                      channels: Optional[int] = None, progress: Optional[ProgressFn] = None) -> Iterator[np.ndarray]:
        """Decode chunk by chunk, yielding ``[C, n]`` float32 blocks in :meth:`output_format`.

        With an :class:`EcdcReader` the file is read as it is decoded (a pipe works): the
        last hop of samples is held back until the end marker gives the exact length, and
        the output is fitted to exactly the input's original length (scaled to
        ``sample_rate`` when that differs), as a whole-file decode would be.

        A salvaging reader (``EcdcReader(f, salvage=True)``) also yields :class:`Gap` s:
        each becomes silence of its length, and decoding restarts with fresh model state
        after it (the chunks after a gap were coded with state we no longer have, so the
        first few milliseconds after a gap are approximate). Lengths the damaged file
        cannot confirm are then fitted instead of refused.
        """
        if isinstance(encoded, EcdcReader):
            reader = encoded
            header, chunks = reader.header, iter(reader)

            def lengths() -> Tuple[Optional[int], Optional[int]]:
                return reader.total_samples, reader.original_samples
        else:
            header, chunks = encoded.header, iter(encoded.chunks)

            def lengths() -> Tuple[Optional[int], Optional[int]]:
                return encoded.num_samples, encoded.original_samples
        salvaging = isinstance(encoded, EcdcReader) and encoded.salvage
        return self._decode_blocks(header, chunks, lengths, sample_rate, channels, progress,
                                   encoded if salvaging else None)

    def _decode_blocks(self, header: EcdcHeader, chunks: Iterator[Union[CodeChunk, Gap]],
                       lengths: Callable[[], Tuple[Optional[int], Optional[int]]],
                       sample_rate: Optional[int], channels: Optional[int],
                       progress: Optional[ProgressFn],
                       salvage: Optional[EcdcReader] = None) -> Iterator[np.ndarray]:
        self.check_compatible(header)
        out_rate, out_channels = self.output_format(header, sample_rate, channels)
        coded_channels = header.channels * header.streams
        hop = header.hop_length
        resampler = None
        if out_rate != header.sample_rate:
            resampler = soxr.ResampleStream(header.sample_rate, out_rate, coded_channels,
                                            dtype="float32", quality="HQ")
        fitter = _LengthFitter(coded_channels, margin=max(64, 4 * -(-out_rate // header.sample_rate)))
        decoder = None
        held = np.zeros((coded_channels, 0), dtype=np.float32)  # model-rate audio not yet final
        released = 0  # model-rate samples passed on
        # Memory stays flat whatever the output format: at most _BLOCK_ELEMENTS samples x
        # channels reach the resampler's output and each channel conversion.
        out_block = max(1, _BLOCK_ELEMENTS // max(coded_channels, out_channels))
        in_block = max(1, _BLOCK_ELEMENTS // (coded_channels * -(-out_rate // header.sample_rate)))

        def out_blocks(wav: np.ndarray) -> Iterator[np.ndarray]:
            for start in range(0, wav.shape[-1], out_block):
                yield audio.to_channels(wav[:, start:start + out_block], out_channels)

        def stage(wav: np.ndarray, last: bool) -> Iterator[np.ndarray]:
            if resampler is None:
                for piece in fitter.push(wav):
                    yield from out_blocks(piece)
                return
            starts = range(0, wav.shape[-1], in_block) or range(1)
            for start in starts:
                final = last and start == starts[-1]
                piece = wav[:, start:start + in_block]
                if piece.shape[-1] or final:
                    for fitted in fitter.push(_resample_chunk(resampler, piece, final)):
                        yield from out_blocks(fitted)

        def decoded(out: torch.Tensor, where: Union[CodeChunk, str]) -> np.ndarray:
            """The decoder's output as numpy, refused if not finite (a hostile scale)."""
            wav = _flat(out)
            if not np.isfinite(wav).all():
                what = where if isinstance(where, str) else (
                    f"code chunk {where.index}" if where.index is not None else "a code chunk")
                raise FormatError(f"corrupt .ecdc stream: {what} decodes to audio that is not finite "
                                  f"(scale {getattr(where, 'scale', None)!r})")
            return wav

        seconds_per_chunk = (header.segment_stride / header.sample_rate) if header.segmented else None
        for chunk in chunks:
            if isinstance(chunk, Gap):
                # Everything before the gap is final: flush it, fitted to where the gap
                # starts (a segmented model's last segment overlaps into it), then silence.
                if decoder is not None:
                    with torch.inference_mode():
                        held = np.concatenate([held, decoded(decoder.flush(), "the chunk before a gap")],
                                              axis=1)
                    decoder = None
                held = held[:, :max(0, chunk.start_sample - released)]
                silence = chunk.start_sample + chunk.num_samples - released - held.shape[1]
                for piece in itertools.chain([held], _silence(coded_channels, silence)):
                    yield from stage(piece, last=False)
                    released += piece.shape[1]
                held = held[:, :0]
                if progress is not None:
                    progress(chunk.num_samples / header.sample_rate)
                continue
            if decoder is None:
                decoder = StreamingDecoder(self.model)
            # A segment is decoded whole (the reader bounds it to one segment's frames); a
            # run of frames goes in bounded pieces, which the streaming decoder turns into
            # the same audio.
            n_frames = chunk.codes.shape[-1]
            step = n_frames if header.segmented else _PUSH_FRAMES
            for first in range(0, n_frames, step):
                with torch.inference_mode():
                    out = decoder.push(self._segment(chunk.codes[..., first:first + step], chunk.scale))
                held = np.concatenate([held, decoded(out, chunk)], axis=1)
                ready = held.shape[1] - hop  # the last hop may lie past the end
                if ready > 0:
                    yield from stage(held[:, :ready], last=False)
                    released += ready
                    held = held[:, ready:]
            if progress is not None:
                progress(seconds_per_chunk or chunk.codes.shape[-1] * hop / header.sample_rate)
        total, original = lengths()
        if decoder is not None:
            with torch.inference_mode():
                held = np.concatenate([held, decoded(decoder.flush(), "the last code chunk")], axis=1)
        available = released + held.shape[1]
        if salvage is not None:
            # A damaged file: the length its evidence supports, else what was recovered
            # (trimmed to the length it states, never padded to it: an 81-byte file can
            # state a week).
            length = salvage.salvaged_samples
            if length is None:
                stated = total if total is not None else header.num_samples
                length = available if stated is None else min(stated, available)
                original = None
            total = max(length, released)
            held = held[:, :total - released]
            if original is not None and header.original_sample_rate:
                fitter.target = round(original * out_rate / header.original_sample_rate)
            missing = total - released - held.shape[1]  # proven but not recovered: silence
            for piece in itertools.chain([held], _silence(coded_channels, missing)):
                yield from stage(piece, last=False)
            yield from stage(held[:, :0], last=True)
            for piece in fitter.finish():
                yield from out_blocks(piece)
            return
        if total is None:  # pragma: no cover - the reader raises before this
            raise FormatError(".ecdc stream ended without an end marker")
        if decoder is None and total:
            raise FormatError(f"file claims {total} samples but holds no audio frames")
        if total > available:
            raise FormatError(f"file claims {total} samples but its frames decode to only {available}")
        if total < released:
            raise FormatError(f"file claims {total} samples but its frames decode to at least {released}")
        if original is not None and header.original_sample_rate:
            # Give back exactly as many samples as went in (resampling can be off by one).
            fitter.target = round(original * out_rate / header.original_sample_rate)
        yield from stage(held[:, :total - released], last=True)
        for piece in fitter.finish():
            yield from out_blocks(piece)

    # -- bytes ------------------------------------------------------------------------

    def compress(self, wav: np.ndarray, sample_rate: int, bandwidth: float = 6.0,
                 stereo: Optional[str] = None) -> bytes:
        return self.encode(wav, sample_rate, bandwidth, stereo).to_bytes()

    def decompress(self, data: bytes, sample_rate: Optional[int] = None,
                   channels: Optional[int] = None) -> Tuple[np.ndarray, int]:
        return self.decode(EncodedAudio.from_bytes(data), sample_rate, channels)

    def check_compatible(self, header: EcdcHeader) -> None:
        """Refuse to decode a file with weights other than those it was encoded with."""
        known = header.weights_fingerprint != UNKNOWN_FINGERPRINT
        if known and header.weights_fingerprint != self.fingerprint:
            raise ModelError(
                f"encoded with model {header.model_name!r} (weights {header.weights_fingerprint.hex()[:16]}), "
                f"but the loaded model {self.name!r} has other weights ({self.fingerprint.hex()[:16]}); "
                "pass the matching --model or --checkpoint"
            )
        if not known and header.model_name != self.name:
            raise ModelError(f"encoded with model {header.model_name!r}, not {self.name!r}")
        model = self.model
        expected = {
            "sample rate": (header.sample_rate, model.sample_rate),
            "channels": (header.channels, model.channels),
            "hop length": (header.hop_length, model.hop_length),
            "bits per code": (header.bits_per_code, model.bits_per_code),
            "segment length": (header.segment_length, model.segment_length or 0),
            "scale flag": (header.has_scale, bool(model.config.normalize)),
        }
        for what, (got, want) in expected.items():
            if got != want:
                raise ModelError(f"file's {what} is {got} but model {self.name!r} has {want}")
        if header.num_codebooks > model.max_codebooks:
            raise ModelError(f"file uses {header.num_codebooks} codebooks; model {self.name!r} has "
                             f"{model.max_codebooks}")

    # -- internals ------------------------------------------------------------------

    def _layout(self, channels: int, stereo: Optional[str]) -> Tuple[StereoMode, int]:
        """How ``channels`` input channels are coded: the mode and the channels fed to the model."""
        if stereo is not None and stereo not in STEREO_CHOICES:
            raise ModelError(f"unknown stereo mode {stereo!r} (use {' or '.join(STEREO_CHOICES)})")
        if channels < 1:
            raise AudioError(f"invalid channel count {channels}")
        audio.check_channels(channels)  # any source, before the header that records it
        if self.channels > 1:
            if stereo == "dual":
                raise ModelError(f"--stereo dual is for mono models; {self.name!r} codes "
                                 f"{self.channels} channels jointly")
            return StereoMode.JOINT, self.channels
        if channels == 1:
            return StereoMode.MONO, 1
        if stereo == "dual":
            if self.model.config.normalize:
                raise ModelError(f"--stereo dual is not available for {self.name!r} (per-segment scaling)")
            return StereoMode.DUAL, 2
        return StereoMode.DOWNMIX, 1

    def _segment(self, codes: np.ndarray, scale: Optional[float]) -> EncodedSegment:
        tensor = torch.from_numpy(codes.astype(np.int64)).to(self.device)
        scale_t = None
        if scale is not None:
            scale_t = torch.full((codes.shape[0],), float(scale), dtype=torch.float32, device=self.device)
        return EncodedSegment(tensor, scale_t)


class _Chunker:
    """Cuts the encoder's output into container chunks, as the whole-file path always has.

    Segmented models: one chunk per segment (with its scale). Unsegmented ones: runs of
    frames regrouped into chunks of ``per_chunk`` frames (about one second).
    """

    def __init__(self, per_chunk: int, segmented: bool):
        self.per_chunk = per_chunk
        self.segmented = segmented
        self._codes: List[np.ndarray] = []
        self._frames = 0

    def add(self, segments: Sequence[EncodedSegment]) -> Iterator[CodeChunk]:
        for seg in segments:
            codes = seg.codes.to("cpu").numpy().astype(np.uint16)
            if self.segmented:
                scale = None if seg.scale is None else float(seg.scale.reshape(-1)[0])
                yield CodeChunk(np.ascontiguousarray(codes), scale)
                continue
            if not codes.shape[-1]:
                continue
            self._codes.append(codes)
            self._frames += codes.shape[-1]
            if self._frames >= self.per_chunk:
                yield from self._cut(final=False)

    def flush(self) -> Iterator[CodeChunk]:
        return self._cut(final=True)

    def _cut(self, final: bool) -> Iterator[CodeChunk]:
        if not self._codes:
            return
        codes = np.concatenate(self._codes, axis=-1) if len(self._codes) > 1 else self._codes[0]
        n = codes.shape[-1]
        full = n - n % self.per_chunk if not final else n
        for start in range(0, full, self.per_chunk):
            yield CodeChunk(np.ascontiguousarray(codes[..., start:min(start + self.per_chunk, full)]))
        rest = codes[..., full:]
        self._codes = [rest] if rest.shape[-1] else []
        self._frames = rest.shape[-1]


class _LengthFitter:
    """Passes audio through, holding back the tail until the exact output length is known.

    Once ``target`` is set (at the end), the output is trimmed or zero-padded to exactly
    that many samples; without a target everything passes unchanged.
    """

    def __init__(self, channels: int, margin: int):
        self.channels = channels
        self.margin = margin
        self.target: Optional[int] = None
        self._held = np.zeros((channels, 0), dtype=np.float32)
        self._emitted = 0

    def push(self, wav: np.ndarray) -> Iterator[np.ndarray]:
        if not wav.shape[-1]:
            return
        held = np.concatenate([self._held, wav], axis=1) if self._held.shape[1] else wav
        ready = held.shape[1] - self.margin
        if ready > 0:
            self._emitted += ready
            yield held[:, :ready]
            held = held[:, ready:]
        self._held = held

    def finish(self) -> Iterator[np.ndarray]:
        """The held tail, trimmed to ``target``, then any padding in bounded blocks."""
        held = self._held
        self._held = np.zeros((self.channels, 0), dtype=np.float32)
        pad = 0
        if self.target is not None:
            want = max(0, self.target - self._emitted)
            held, pad = held[:, :want], max(0, want - held.shape[1])
        if held.shape[1]:
            self._emitted += held.shape[1]
            yield held
        for block in _silence(self.channels, pad):
            self._emitted += block.shape[1]
            yield block


def _write_stream(events: Iterator[Union[EcdcHeader, CodeChunk, _Totals]], out: BinaryIO,
                  keep: Optional[List[CodeChunk]] = None) -> StreamResult:
    """Write the encoder's events as a .ecdc stream, flushing each chunk as it comes."""
    writer: Optional[EcdcWriter] = None
    result: Optional[StreamResult] = None
    flush = getattr(out, "flush", None)
    for item in events:
        if isinstance(item, EcdcHeader):
            writer = EcdcWriter(out, item)
        elif isinstance(item, CodeChunk):
            writer.write_chunk(item)
            if keep is not None:
                keep.append(item)
        else:
            writer.finish(item.num_samples, item.original_samples)
            result = StreamResult(writer.header, item.num_samples, item.original_samples, writer.chunks_written)
        if flush is not None:
            flush()
    return result


def _silence(channels: int, num_samples: int) -> Iterator[np.ndarray]:
    """``num_samples`` of silence in bounded blocks: a salvaged gap may be days long."""
    zeros = np.zeros((channels, min(_SILENCE_BLOCK, max(0, num_samples))), dtype=np.float32)
    for start in range(0, num_samples, _SILENCE_BLOCK):
        yield zeros[:, :min(_SILENCE_BLOCK, num_samples - start)]


def _resample_chunk(resampler: "soxr.ResampleStream", wav: np.ndarray, last: bool) -> np.ndarray:
    """Streaming libsoxr on ``[C, n]`` audio; bit-identical to resampling it whole."""
    out = resampler.resample_chunk(np.ascontiguousarray(wav.T, dtype=np.float32), last=last)
    return np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(-1, wav.shape[0]).T)


def _flat(out: torch.Tensor) -> np.ndarray:
    """Decoder output ``[B, C, n]`` -> ``[B*C, n]`` float32 (DUAL stacks the two streams)."""
    arr = out.to("cpu").numpy()
    return np.ascontiguousarray(arr.reshape(arr.shape[0] * arr.shape[1], arr.shape[-1]), dtype=np.float32)


# -- loading ------------------------------------------------------------------------

def load_model(name_or_path: Optional[str] = None, device: str = "cpu",
               checkpoint: Optional[str] = None, progress=None) -> Codec:
    """Load a codec by registry name, by checkpoint path, or (neither) the default model.

    ``load_model()`` loads ecdc's bundled default (the newest release of its family);
    ``load_model("encodec_24khz")`` downloads Meta's weights on first use;
    ``load_model("run/checkpoint.th")`` loads a local file; ``name`` plus ``checkpoint``
    loads the named architecture with weights from the file.
    """
    name = name_or_path
    if checkpoint is None and name is not None and not weights.is_known(name):
        if os.path.exists(name) or os.sep in name or name.endswith((".th", ".pt", ".pth")):
            name, checkpoint = None, name
    if name is None and checkpoint is None:
        name = weights.default_model()
    dev = resolve_device(device)
    model, fingerprint = load_weights(name, checkpoint, progress=progress)
    return Codec(model, fingerprint, dev)


def load_model_for(header: EcdcHeader, model: Optional[str] = None, checkpoint: Optional[str] = None,
                   device: str = "cpu", progress=None) -> Codec:
    """The codec that decodes a file: the one the caller names, else the one its header names.

    ecdc's releases write their versioned name (``ecdc_24khz_v1``), so a file decodes with
    the release that wrote it, whichever release is the default now.
    """
    if model is None and checkpoint is None:
        if not weights.is_known(header.model_name):
            raise ModelError(f"encoded with model {header.model_name!r}, which ecdc does not know by name; "
                             "pass its weights with --checkpoint PATH")
        model = header.model_name
    return load_model(model, device=device, checkpoint=checkpoint, progress=progress)


def compress(wav: np.ndarray, sample_rate: int, model: Union[None, str, Codec] = None,
             bandwidth: float = 6.0, stereo: Optional[str] = None) -> bytes:
    """Encode audio to the bytes of a .ecdc file."""
    codec = model if isinstance(model, Codec) else load_model(model)
    return codec.compress(wav, sample_rate, bandwidth, stereo)


def decompress(data: bytes, model: Union[None, str, Codec] = None,
               sample_rate: Optional[int] = None, channels: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Decode the bytes of a .ecdc file (Meta's v0 files included) to ``([C, T], rate)``.

    Without ``model`` the model named in the file's header is loaded.
    """
    encoded = EncodedAudio.from_bytes(data)
    codec = model if isinstance(model, Codec) else load_model_for(encoded.header, model)
    return codec.decode(encoded, sample_rate, channels)


# -- files ----------------------------------------------------------------------------

#: errno values that mean "the output cannot grow", and what usually causes them.
_WRITE_ERRNOS = {errno.ENOSPC: "disk full", errno.EFBIG: "a file-size limit or the file system's maximum",
                 errno.EDQUOT: "disk quota exceeded"}

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are told apart by age alone
    fcntl = None  # type: ignore[assignment]

#: When this run started: a temp file of ours older than this was left by a killed run.
_RUN_START = time.time()
_TEMP_SUFFIX = ".tmp"
#: The characters of the 8-character middle of ``.NAME.XXXXXXXX.tmp`` (ours are hex; older
#: ecdc versions used tempfile.mkstemp, whose names use all of these).
_TEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


@contextlib.contextmanager
def atomic_output(path: Union[str, Path], overwrite: bool = True) -> Iterator[BinaryIO]:
    """Write an output so that a failure never leaves a half-written file behind.

    This is the one place ecdc writes output files; what it does depends on what ``path``
    is (docs/ROBUSTNESS.md, "Output safety"):

    * nothing, or a regular file: the data goes to a new ``.NAME.XXXXXXXX.tmp`` beside it,
      which is renamed over ``path`` only when complete. A failure (disk full, a signal, a
      corrupt input found half way) removes the temp file and leaves an existing file as it
      was. Without ``overwrite`` an existing file is refused, and the rename itself fails if
      a file appeared at ``path`` while writing (so of two concurrent writers one fails
      instead of one output being silently lost).
    * a character or block device, a FIFO or a socket: written directly, as ``cat > path``
      would; a special file is never replaced by a regular one (``-o /dev/null -f``).
    * a symlink: followed, and its final target gets these rules: a regular file is replaced
      at the target's path (the link stays), a device or FIFO is written directly. A
      dangling link is refused: ecdc does not create files where a link points.
    * a directory: refused.

    A new file gets mode ``0o666 & ~umask`` (and the directory's default ACL), as a plain
    ``open()`` gives, also when it replaces a file with other permissions. Temp files of the
    same pattern for the same output that a killed run left (older than this run, held by
    no live writer) are removed first.
    """
    shown = Path(path)
    kind, final = _output_target(shown, overwrite)
    if kind == "special":
        with _direct_output(shown) as handle:
            yield handle
        return
    remove_temp_files(final, older_than=_RUN_START)
    fd, tmp = _create_temp(final, shown)
    try:
        with os.fdopen(fd, "wb") as handle:
            _try_lock(fd)  # held until the rename: cleanup never takes a live writer's file
            yield handle
            handle.flush()
            os.fsync(fd)
            _commit(tmp, final, shown, overwrite)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write {shown}: {exc.strerror} ({_WRITE_ERRNOS[exc.errno]}); "
                              f"nothing was written") from None
        raise


def _output_target(shown: Path, overwrite: bool) -> Tuple[str, Path]:
    """``("special", path)`` to write directly, or ``("file", path)`` of the regular file to
    create or replace (a symlink's target); refusals as :class:`OutputError`."""
    try:
        info = os.stat(shown)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(shown):
            raise OutputError(f"cannot write {shown}: it is a symlink to {_link_text(shown)}, which does not "
                              f"exist (ecdc writes through links only to existing files)") from None
        return "file", shown
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise OutputError(f"cannot write {shown}: it is a directory")
    if not overwrite:
        raise OutputError(f"{shown} exists; use -f to overwrite")
    if not stat.S_ISREG(info.st_mode):
        return "special", shown
    if not os.path.islink(shown):
        return "file", shown
    final = Path(os.path.realpath(shown))
    try:
        same = os.path.samestat(info, os.stat(final))
    except OSError:
        same = False
    if not same:  # e.g. /proc/self/fd/N of a deleted file: no path to put a new file at
        raise OutputError(f"cannot write {shown}: its symlink does not lead to a path where a file can be replaced")
    return "file", final


def _link_text(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "a missing file"


def _create_temp(final: Path, shown: Path) -> Tuple[int, Path]:
    """A new ``.NAME.XXXXXXXX.tmp`` beside ``final``, created with mode 0o666 so that the
    kernel applies the umask (and default ACLs) as for a plain open(); mkstemp's 0600
    would stay on the output."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create {shown}: {exc.strerror or exc}") from None
    raise OutputError(f"cannot create {shown}: no unused temporary name beside it")


@contextlib.contextmanager
def _direct_output(shown: Path) -> Iterator[BinaryIO]:
    """Write straight into a device, FIFO or socket (opening a FIFO waits for a reader)."""
    try:
        fd = os.open(shown, os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))  # no O_CREAT
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror or exc}") from None
    if stat.S_ISREG(os.fstat(fd).st_mode) or stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)  # replaced by a file since it was looked at: writing in place would not be atomic
        raise OutputError(f"cannot write {shown}: it was replaced while ecdc opened it")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write {shown}: {exc.strerror} ({_WRITE_ERRNOS[exc.errno]})") from None
        raise


def _commit(tmp: Path, final: Path, shown: Path, overwrite: bool) -> None:
    """Rename the finished temp file into place; without ``overwrite`` never over a file."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        _rename_noreplace(tmp, final)
    except FileExistsError:
        raise OutputError(f"{shown} exists (created while ecdc was writing); use -f to overwrite") from None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with FileExistsError when ``dst`` exists, atomically: Linux's
    renameat2(RENAME_NOREPLACE), else link(2) (which never replaces) and unlink."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # else: not on this file system
            raise OSError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(dst):  # no hard links here (FAT, some network file systems): not atomic
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


@functools.lru_cache(maxsize=None)
def _renameat2() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (old glibc, some musl)
        return None


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another process holds one
    (or the file system cannot tell: then the file is treated as held)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _is_temp_name(name: str, target_name: str) -> bool:
    """Whether ``name`` is exactly ``.TARGET.XXXXXXXX.tmp``; compared as strings, because
    output names may hold glob characters (``a*.ecdc``, ``[x].ecdc``)."""
    prefix = f".{target_name}."
    if len(name) != len(prefix) + 8 + len(_TEMP_SUFFIX):
        return False
    middle = name[len(prefix):-len(_TEMP_SUFFIX)]
    return name.startswith(prefix) and name.endswith(_TEMP_SUFFIX) and all(c in _TEMP_CHARS for c in middle)


def remove_temp_files(path: Union[str, Path], older_than: Optional[float] = None) -> List[str]:
    """Remove the temp files :func:`atomic_output` left for ``path`` (a killed process's).

    Only files named exactly ``.NAME.XXXXXXXX.tmp`` for this output are candidates, and of
    them only those no live process is writing (each writer holds an exclusive flock on its
    temp file until the rename) and, with ``older_than``, not modified since that time.
    Nothing else in the folder is ever touched. Returns the paths removed.
    """
    target = Path(path)
    if os.path.islink(target):
        target = Path(os.path.realpath(target))  # where atomic_output puts a link's temp file
    directory = target.parent
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed: List[str] = []
    for name in names:
        if not _is_temp_name(name, target.name):
            continue
        tmp = directory / name
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or (older_than is not None and info.st_mtime >= older_than):
                continue
            if not _try_lock(fd) or not os.path.samestat(info, os.lstat(tmp)):
                continue
            os.unlink(tmp)
            removed.append(str(tmp))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def compress_file(src: Union[str, Path], dst: Union[str, Path], model: Union[None, str, Codec] = None,
                  bandwidth: float = 6.0, stereo: Optional[str] = None, overwrite: bool = True) -> EncodedAudio:
    """Compress an audio file to a .ecdc file (streamed, written by :func:`atomic_output`).

    Returns what was written; its chunks are kept in memory for the caller (codes are
    about 0.1 % of the PCM size), the audio never is. ``overwrite=False`` refuses an
    existing ``dst`` (also one created while writing) with :class:`OutputError`.
    """
    codec = model if isinstance(model, Codec) else load_model(model)
    chunks: List[CodeChunk] = []
    with open_audio_file(str(src)) as source, atomic_output(dst, overwrite) as out:
        result = _write_stream(codec._encode_events(source, bandwidth, stereo), out, keep=chunks)
    return EncodedAudio(result.header, chunks, result.num_samples, result.original_samples)


def decompress_file(src: Union[str, Path], dst: Union[str, Path], model: Union[None, str, Codec] = None,
                    sample_rate: Optional[int] = None, channels: Optional[int] = None,
                    overwrite: bool = True) -> Tuple[np.ndarray, int]:
    """Decompress a .ecdc file to a 16-bit wav (streamed, written by :func:`atomic_output`);
    returns the audio too. ``overwrite`` as for :func:`compress_file`."""
    with open(src, "rb") as f:
        reader = EcdcReader(f)
        codec = model if isinstance(model, Codec) else load_model_for(reader.header, model)
        rate, chans = codec.output_format(reader.header, sample_rate, channels)
        blocks: List[np.ndarray] = []
        with atomic_output(dst, overwrite) as out:
            sink = WavStreamWriter(out, rate, chans)
            for block in codec.decode_blocks(reader, sample_rate, channels):
                sink.write(block)
                blocks.append(block)
            sink.close()
    wav = np.concatenate(blocks, axis=1) if blocks else np.zeros((chans, 0), dtype=np.float32)
    return wav, rate
