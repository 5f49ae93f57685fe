"""Compress and decompress audio: the glue between model, audio conversion and container.

The model works at its own rate and channel count on torch tensors; the container holds
numpy codes; this module converts between the user's audio and both, and records in
the header what is needed to give the user back what went in. Converting files (paths,
pipes, atomic outputs) is :mod:`ecdc.convert`'s, one layer up; ``compress_file`` and
``decompress_file`` are still importable from here.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import soxr
import torch

from . import audio, weights
from .container import CodeChunk, EcdcHeader, EcdcReader, EcdcWriter, Gap, StereoMode
from .devices import resolve_device
from .errors import AudioError, FormatError, ModelError
from .models.encodec import EncodecModel, EncodedSegment
from .models.streaming import StreamingDecoder, StreamingEncoder
from .pipeline import Chunker, LengthFitter, flat, resample_chunk, silence
from .wavstream import ArraySource, AudioSource
from .weights import load_weights

STEREO_CHOICES = ("downmix", "dual")
# Most samples x channels in one block of decoded audio, before and after resampling and
# channel conversion: a header may ask for 1024 channels at 1 MHz (41.7 times the model's
# rate), so blocks are sized from the output format, not the input (4 MiB of float32).
_BLOCK_ELEMENTS = 1 << 20
# An unsegmented chunk is pushed to the decoder this many frames at a time: a CRC-valid
# 16 MiB chunk can hold millions of frames, which decoded at once would be gigabytes.
_PUSH_FRAMES = 1024
UNKNOWN_FINGERPRINT = bytes(16)


@dataclass
class EncodedAudio:
    """Everything a .ecdc file holds, in memory."""

    header: EcdcHeader
    chunks: list[CodeChunk] = field(default_factory=list)
    num_samples: int = 0
    #: the input's length at header.original_sample_rate (None: unknown)
    original_samples: int | None = None

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
        return cls.from_reader(EcdcReader(fileobj))

    @classmethod
    def from_reader(cls, reader: EcdcReader) -> "EncodedAudio":
        """All of what ``reader`` holds, read to its end marker (strict: any damage raises)."""
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

DownloadFn = Callable[[int, int | None], None]
"""Called with the bytes of weights downloaded so far and the total (None: unknown)."""


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

    def __init__(self, model: EncodecModel, fingerprint: bytes, device: str | torch.device = "cpu"):
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
    def bandwidths(self) -> tuple[float, ...]:
        return tuple(self.model.bandwidths)

    def check_bandwidth(self, bandwidth: float) -> None:
        """Refuse a bandwidth this model does not code at, naming the ones it does, so that a
        bad ``-b`` fails before any audio is read."""
        self.model.num_codebooks(bandwidth)

    def release_unused(self, keep: str) -> None:
        """Keep only the half one direction needs (``"encode"`` or ``"decode"``): a process
        that converts one way has a smaller peak memory; this codec cannot go the other way."""
        self.model.release_unused(keep)

    # -- encoding -------------------------------------------------------------------

    def encode(self, wav: np.ndarray, sample_rate: int, bandwidth: float = 6.0,
               stereo: str | None = None) -> EncodedAudio:
        """Encode ``[C, T]`` (or ``[T]``) float audio at any rate and channel count.

        ``stereo`` applies to mono models given multi-channel input: ``downmix`` (default)
        codes the mean, ``dual`` codes the first two channels (after mixing more down to
        two) separately at twice the bitrate.
        """
        source = ArraySource(wav, int(sample_rate))
        header: EcdcHeader | None = None
        chunks: list[CodeChunk] = []
        totals = _Totals(0, 0)
        for item in self._encode_events(source, bandwidth, stereo):
            if isinstance(item, EcdcHeader):
                header = item
            elif isinstance(item, CodeChunk):
                chunks.append(item)
            else:
                totals = item
        assert header is not None, "the encoder yields its header first"
        # In memory the length is known, so the header carries it too.
        header = dataclasses.replace(header, num_samples=totals.num_samples)
        return EncodedAudio(header, chunks, totals.num_samples, totals.original_samples)

    def compress_stream(self, source: AudioSource, out: BinaryIO, bandwidth: float = 6.0,
                        stereo: str | None = None, progress: ProgressFn | None = None,
                        keep: list[CodeChunk] | None = None) -> StreamResult:
        """Encode ``source`` block by block into a .ecdc stream written to ``out``.

        The header goes out first (its sample count "unknown"; the end marker carries it)
        and every chunk is written and flushed as soon as its frames are coded, so ``out``
        can be a pipe that a reader consumes while the input is still arriving. Each chunk
        written is also appended to ``keep`` when given (codes are about 0.1 % of the PCM size).
        """
        return _write_stream(self._encode_events(source, bandwidth, stereo, progress), out, keep)

    def _encode_events(self, source: AudioSource, bandwidth: float, stereo: str | None,
                       progress: ProgressFn | None = None) -> Iterator[EcdcHeader | CodeChunk | _Totals]:
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
        chunker = Chunker(max(1, int(np.ceil(self.model.frame_rate))), self.model.segment_length is not None)
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
                coded = resample_chunk(resampler, coded, last=False)
            yield from feed(coded)
            if progress is not None:
                progress(block.shape[-1] / in_rate)
        if resampler is not None and original:
            yield from feed(resample_chunk(resampler, np.zeros((coded_channels, 0), np.float32), last=True))
        if encoder is not None:
            with torch.inference_mode():
                segments = encoder.flush()
            yield from chunker.add(segments)
        yield from chunker.flush()
        yield _Totals(total, original)

    # -- decoding -------------------------------------------------------------------

    def output_format(self, header: EcdcHeader, sample_rate: int | None = None,
                      channels: int | None = None) -> tuple[int, int]:
        """(rate, channels) a decode gives: the original input's unless overridden."""
        rate = int(sample_rate or header.original_sample_rate or header.sample_rate)
        chans = int(channels or header.original_channels or header.channels)
        return rate, chans

    def decode(self, encoded: EncodedAudio, sample_rate: int | None = None,
               channels: int | None = None) -> tuple[np.ndarray, int]:
        """Decode to ``[C, T]`` float32 at the original rate and channel count (or those given)."""
        rate, chans = self.output_format(encoded.header, sample_rate, channels)
        blocks = list(self.decode_blocks(encoded, sample_rate, channels))
        if not blocks:
            return np.zeros((chans, 0), dtype=np.float32), rate
        return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32), rate

    def decode_blocks(self, encoded: EcdcReader | EncodedAudio, sample_rate: int | None = None,
                      channels: int | None = None, progress: ProgressFn | None = None) -> Iterator[np.ndarray]:
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
            salvage = reader if reader.salvage else None

            def lengths() -> tuple[int | None, int | None]:
                return reader.total_samples, reader.original_samples
        else:
            header, chunks = encoded.header, iter(encoded.chunks)
            salvage = None

            def lengths() -> tuple[int | None, int | None]:
                return encoded.num_samples, encoded.original_samples
        # Checked now, not at the first block: a caller that asks for the blocks before
        # opening its output refuses a file of other weights before anything is written.
        self.check_compatible(header)
        return self._decode_blocks(header, chunks, lengths, sample_rate, channels, progress, salvage)

    def _decode_blocks(self, header: EcdcHeader, chunks: Iterator[CodeChunk | Gap],
                       lengths: Callable[[], tuple[int | None, int | None]],
                       sample_rate: int | None, channels: int | None,
                       progress: ProgressFn | None,
                       salvage: EcdcReader | None = None) -> Iterator[np.ndarray]:
        out_rate, out_channels = self.output_format(header, sample_rate, channels)
        coded_channels = header.channels * header.streams
        hop = header.hop_length
        resampler = None
        if out_rate != header.sample_rate:
            resampler = soxr.ResampleStream(header.sample_rate, out_rate, coded_channels,
                                            dtype="float32", quality="HQ")
        fitter = LengthFitter(coded_channels, margin=max(64, 4 * -(-out_rate // header.sample_rate)))
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

        def stage(wav: np.ndarray) -> Iterator[np.ndarray]:
            """Model-rate audio that is final: resampled, fitted, in the output's channels."""
            pieces = [wav] if resampler is None else (
                resample_chunk(resampler, wav[:, start:start + in_block], last=False)
                for start in range(0, wav.shape[-1], in_block))
            for piece in pieces:
                for fitted in fitter.push(piece):
                    yield from out_blocks(fitted)

        def finish() -> Iterator[np.ndarray]:
            """The resampler's and the fitter's tails (libsoxr gives the same samples for
            ``[a, b](last)`` as for ``[a, b, empty(last)]``)."""
            if resampler is not None:
                empty = np.zeros((coded_channels, 0), dtype=np.float32)
                for fitted in fitter.push(resample_chunk(resampler, empty, last=True)):
                    yield from out_blocks(fitted)
            for piece in fitter.finish():
                yield from out_blocks(piece)

        def decoded(out: torch.Tensor, where: CodeChunk | str) -> np.ndarray:
            """The decoder's output as numpy, refused if not finite (a hostile scale)."""
            wav = flat(out)
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
                gap = chunk.start_sample + chunk.num_samples - released - held.shape[1]
                for piece in itertools.chain([held], silence(coded_channels, gap)):
                    yield from stage(piece)
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
                    yield from stage(held[:, :ready])
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
            total, original = _salvaged_length(salvage, header, total, original, available, released)
        else:
            total = _checked_length(total, available, released, decoded_any=decoder is not None)
        if original is not None and header.original_sample_rate:
            # Give back exactly as many samples as went in (resampling can be off by one).
            fitter.target = round(original * out_rate / header.original_sample_rate)
        held = held[:, :total - released]
        missing = total - released - held.shape[1]  # salvage: proven but not recovered, so silence
        for piece in itertools.chain([held], silence(coded_channels, missing)):
            yield from stage(piece)
        yield from finish()

    # -- bytes ------------------------------------------------------------------------

    def compress(self, wav: np.ndarray, sample_rate: int, bandwidth: float = 6.0,
                 stereo: str | None = None) -> bytes:
        return self.encode(wav, sample_rate, bandwidth, stereo).to_bytes()

    def decompress(self, data: bytes, sample_rate: int | None = None,
                   channels: int | None = None) -> tuple[np.ndarray, int]:
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

    def _layout(self, channels: int, stereo: str | None) -> tuple[StereoMode, int]:
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

    def _segment(self, codes: np.ndarray, scale: float | None) -> EncodedSegment:
        tensor = torch.from_numpy(codes.astype(np.int64)).to(self.device)
        scale_t = None
        if scale is not None:
            scale_t = torch.full((codes.shape[0],), float(scale), dtype=torch.float32, device=self.device)
        return EncodedSegment(tensor, scale_t)


def _write_stream(events: Iterator[EcdcHeader | CodeChunk | _Totals], out: BinaryIO,
                  keep: list[CodeChunk] | None = None) -> StreamResult:
    """Write the encoder's events as a .ecdc stream, flushing each chunk as it comes."""
    writer: EcdcWriter | None = None
    result: StreamResult | None = None
    flush = getattr(out, "flush", None)
    for item in events:
        if isinstance(item, EcdcHeader):
            writer = EcdcWriter(out, item)
        else:
            assert writer is not None, "the encoder yields its header first"
            if isinstance(item, CodeChunk):
                writer.write_chunk(item)
                if keep is not None:
                    keep.append(item)
            else:
                writer.finish(item.num_samples, item.original_samples)
                result = StreamResult(writer.header, item.num_samples, item.original_samples,
                                      writer.chunks_written)
        if flush is not None:
            flush()
    assert result is not None, "the encoder yields its totals last"
    return result


def _salvaged_length(reader: EcdcReader, header: EcdcHeader, total: int | None, original: int | None,
                     available: int, released: int) -> tuple[int, int | None]:
    """A damaged file's (length, original length): what its evidence supports, else what was
    recovered, trimmed to the length it states but never padded to it (an 81-byte file can
    state a week); the original length only where the evidence supports the length."""
    length = reader.salvaged_samples
    if length is None:
        stated = total if total is not None else header.num_samples
        length = available if stated is None else min(stated, available)
        original = None
    return max(length, released), original


def _checked_length(total: int | None, available: int, released: int, decoded_any: bool) -> int:
    """An intact file's stated length, refused unless its frames decode to it."""
    if total is None:  # pragma: no cover - the reader raises before this
        raise FormatError(".ecdc stream ended without an end marker")
    if not decoded_any and total:
        raise FormatError(f"file claims {total} samples but holds no audio frames")
    if total > available:
        raise FormatError(f"file claims {total} samples but its frames decode to only {available}")
    if total < released:
        raise FormatError(f"file claims {total} samples but its frames decode to at least {released}")
    return total


# -- loading ------------------------------------------------------------------------

def load_model(name_or_path: str | None = None, device: str = "cpu",
               checkpoint: str | None = None, progress: DownloadFn | None = None) -> Codec:
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


def load_model_for(header: EcdcHeader, model: str | None = None, checkpoint: str | None = None,
                   device: str = "cpu", progress: DownloadFn | None = None) -> Codec:
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


def compress(wav: np.ndarray, sample_rate: int, model: str | Codec | None = None,
             bandwidth: float = 6.0, stereo: str | None = None) -> bytes:
    """Encode audio to the bytes of a .ecdc file."""
    codec = model if isinstance(model, Codec) else load_model(model)
    return codec.compress(wav, sample_rate, bandwidth, stereo)


def decompress(data: bytes, model: str | Codec | None = None,
               sample_rate: int | None = None, channels: int | None = None) -> tuple[np.ndarray, int]:
    """Decode the bytes of a .ecdc file (Meta's v0 files included) to ``([C, T], rate)``.

    Without ``model`` the model named in the file's header is loaded.
    """
    encoded = EncodedAudio.from_bytes(data)
    codec = model if isinstance(model, Codec) else load_model_for(encoded.header, model)
    return codec.decode(encoded, sample_rate, channels)


# -- files ----------------------------------------------------------------------------

def __getattr__(name: str) -> Any:
    """``compress_file`` and ``decompress_file``, which live in :mod:`ecdc.convert` (a layer
    above this one), still import from here; looked up on first use, so this module does
    not import the one that imports it."""
    if name in ("compress_file", "decompress_file"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
