"""Compress and decompress audio: the glue between model, audio conversion and container.

The model works at its own rate and channel count on torch tensors; the container holds
numpy codes; this module converts between the user's audio and both, and records in
the header what is needed to give the user back what went in. Converting files (paths,
pipes, atomic outputs) is :mod:`ecdc.convert`'s, one layer up; ``compress_file`` and
``decompress_file`` are still importable from here.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np
import soxr
import torch

from . import audio, weights
from .choices import STEREO_CHOICES
from .container import CodeChunk, EcdcHeader, EcdcReader, EcdcWriter, EncodedAudio, Gap, StereoMode
from .container.header import MAX_SEPARATE_STREAMS
from .dataset import chunks_of, tokens_from
from .devices import resolve_device
from .errors import AudioError, EcdcError, FormatError, ModelError
from .models.encodec import EncodecModel, EncodedSegment
from .models.streaming import StreamingDecoder, StreamingEncoder, engine_seconds
from .pipeline import Chunker, LengthFitter, flat, resample_chunk, silence
from .wavstream import ArraySource, AudioSource
from .weights import load_weights

# Most samples x channels in one block of decoded audio, before and after resampling and
# channel conversion: a header may ask for 1024 channels at 1 MHz (41.7 times the model's
# rate), so blocks are sized from the output format, not the input (4 MiB of float32).
_BLOCK_ELEMENTS = 1 << 20
# An unsegmented chunk is pushed to the decoder this many frames at a time: a CRC-valid
# 16 MiB chunk can hold millions of frames, which decoded at once would be gigabytes.
_PUSH_FRAMES = 1024
UNKNOWN_FINGERPRINT = bytes(16)


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
        codes the ITU-R BS.775 mix (:func:`ecdc.audio.mix_matrix`; the mean of stereo),
        ``separate`` (or ``dual``) codes every channel separately, at that many times the bitrate.
        """
        return self.encode_source(ArraySource(wav, int(sample_rate)), bandwidth, stereo)

    def encode_source(self, source: AudioSource, bandwidth: float = 6.0, stereo: str | None = None,
                      progress: ProgressFn | None = None) -> EncodedAudio:
        """Encode a block source (a file read block by block) to codes kept in memory: the
        audio streams through in bounded memory, the codes (about 0.1 % of its size) are
        kept. The same pipeline as :meth:`compress_stream`, so the same codes."""
        header: EcdcHeader | None = None
        chunks: list[CodeChunk] = []
        totals = _Totals(0, 0)
        for item in self._encode_events(source, bandwidth, stereo, progress):
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

    def encode_codes(self, wav: np.ndarray, sample_rate: int, bandwidth: float = 6.0) -> np.ndarray:
        """The tokens audio language models train on: int16 ``[codebooks, frames]``, exactly
        the codes ``ecdc compress`` writes for this audio (a mono model codes the downmix).
        A model that scales segments (48 kHz) also needs their scales to decode: use
        :meth:`encode`, or ``ecdc tokenize``, which keeps them."""
        encoded = self.encode(wav, sample_rate, bandwidth)
        return tokens_from(encoded.header, encoded.chunks, encoded.num_samples, encoded.original_samples).codes

    def decode_codes(self, codes: np.ndarray, scales: list[float] | None = None) -> np.ndarray:
        """Decode int16 ``[codebooks, frames]`` codes (a language model's output) to float32
        ``[channels, samples]`` at the model's rate; ``scales`` (one per segment) for models
        that scale segments, else 1."""
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ModelError(f"codes must be [codebooks, frames], not of shape {codes.shape}")
        bandwidth = next((b for b in self.bandwidths if self.model.num_codebooks(b) == codes.shape[0]), None)
        if bandwidth is None:
            raise ModelError(f"{codes.shape[0]} codebooks is no bandwidth of {self.name!r}")
        header = self.header_for(bandwidth, StereoMode.MONO if self.channels == 1 else StereoMode.JOINT,
                                 self.sample_rate, self.channels)
        chunks = chunks_of(header, codes, scales)
        step = self.model.segment_stride or 0
        available = (len(chunks) - 1) * step + chunks[-1].num_frames * self.model.hop_length if step and chunks \
            else codes.shape[-1] * self.model.hop_length
        encoded = EncodedAudio(dataclasses.replace(header, num_samples=available), chunks, available, available)
        return self.decode(encoded)[0]

    def header_for(self, bandwidth: float, mode: StereoMode, original_rate: int, original_channels: int,
                   num_samples: int | None = None, channel_mask: int = 0) -> EcdcHeader:
        """The header of this model's codes at ``bandwidth`` for input of that rate and channels
        (``channel_mask``: their speakers, 0 for the default layout of the count)."""
        return EcdcHeader(
            model_name=self.name,
            weights_fingerprint=self.fingerprint,
            sample_rate=self.sample_rate,
            channels=self.channels,
            stereo_mode=mode,
            bandwidth=float(bandwidth),
            num_codebooks=self.model.num_codebooks(bandwidth),
            bits_per_code=self.model.bits_per_code,
            hop_length=self.model.hop_length,
            segment_length=self.model.segment_length or 0,
            segment_stride=self.model.segment_stride or 0,
            has_scale=bool(self.model.config.normalize),
            num_samples=num_samples,
            original_sample_rate=original_rate,
            original_channels=original_channels,
            channel_mask=channel_mask,
        )

    def compress_stream(self, source: AudioSource, out: BinaryIO, bandwidth: float = 6.0,
                        stereo: str | None = None, progress: ProgressFn | None = None,
                        keep: list[CodeChunk] | None = None,
                        tags: Mapping[str, str] | None = None, *, latency: float | None = None) -> StreamResult:
        """Encode ``source`` block by block into a .ecdc stream written to ``out``.

        The header goes out first (its sample count "unknown"; the end marker carries it)
        and every chunk is written and flushed as soon as its frames are coded, so ``out``
        can be a pipe that a reader consumes while the input is still arriving. Each chunk
        written is also appended to ``keep`` when given (codes are about 0.1 % of the PCM size).
        ``tags`` go into the file's tags chunk, after the header (None: the source's own).
        ``latency`` (seconds; None: blocks sized for throughput) codes and writes in blocks
        that short, for a reader waiting on a pipe; the codes are the same.
        """
        return _write_stream(self._encode_events(source, bandwidth, stereo, progress, latency), out, keep,
                             source.tags if tags is None else tags)

    def _encode_events(self, source: AudioSource, bandwidth: float, stereo: str | None,
                       progress: ProgressFn | None = None,
                       latency: float | None = None) -> Iterator[EcdcHeader | CodeChunk | _Totals]:
        """The one encoding pipeline: yields the header, then code chunks, then the totals."""
        num_codebooks = self.model.num_codebooks(bandwidth)
        in_rate = int(source.sample_rate)
        audio.check_sample_rate(in_rate)  # the header can hold no other original rate
        mode, coded_channels = self._layout(source.channels, stereo)
        in_layout = audio.channel_layout(source.channels, getattr(source, "channel_mask", None))
        coded_layout = in_layout if coded_channels == source.channels else audio.channel_layout(coded_channels)
        # Stored only where it is not the default, so that such files stay version 1.0 files.
        mask = audio.layout_mask(in_layout)
        stored_mask = 0 if mask == audio.default_channel_mask(source.channels) else mask
        yield self.header_for(bandwidth, mode, in_rate, source.channels, channel_mask=stored_mask)
        resampler = None
        if in_rate != self.sample_rate:
            resampler = soxr.ResampleStream(in_rate, self.sample_rate, coded_channels,
                                            dtype="float32", quality="HQ")
        encoder = None
        chunker = Chunker(max(1, int(np.ceil(self.model.frame_rate))), self.model.segment_length is not None,
                          eager=latency is not None)
        original = total = 0

        def feed(coded: np.ndarray) -> Iterator[CodeChunk]:
            nonlocal encoder, total
            if not coded.shape[-1]:
                return
            total += coded.shape[-1]
            # DUAL and SEPARATE code each channel as its own batch item through the mono model.
            batch = coded[:, None, :] if mode in (StereoMode.DUAL, StereoMode.SEPARATE) else coded[None]
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            with torch.inference_mode():
                if encoder is None:
                    encoder = StreamingEncoder(self.model, num_codebooks, **engine_seconds(latency))
                segments = encoder.push(x)
            yield from chunker.add(segments)

        for block in source.blocks():
            if block.shape[0] != source.channels:
                raise AudioError(f"audio block has {block.shape[0]} channels, expected {source.channels}")
            audio.check_finite(block, in_rate, offset=original)
            original += block.shape[-1]
            coded = block if coded_channels == block.shape[0] else audio.remix(block, in_layout, coded_layout)
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
        """(rate, channels) a decode gives: the original rate, and the coded channels (the
        original count where every original channel was coded: :func:`ecdc.audio.decoded_layout`),
        unless overridden."""
        rate = int(sample_rate or header.original_sample_rate or header.sample_rate)
        return rate, len(audio.decoded_layout(header, channels))

    def decode(self, encoded: EncodedAudio, sample_rate: int | None = None,
               channels: int | None = None) -> tuple[np.ndarray, int]:
        """Decode to ``[C, T]`` float32 at the original rate and channel count (or those given)."""
        rate, chans = self.output_format(encoded.header, sample_rate, channels)
        blocks = list(self.decode_blocks(encoded, sample_rate, channels))
        if not blocks:
            return np.zeros((chans, 0), dtype=np.float32), rate
        return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32), rate

    def decode_blocks(self, encoded: EcdcReader | EncodedAudio, sample_rate: int | None = None,
                      channels: int | None = None, progress: ProgressFn | None = None, *,
                      latency: float | None = None) -> Iterator[np.ndarray]:
        """Decode chunk by chunk, yielding ``[C, n]`` float32 blocks in :meth:`output_format`;
        ``latency`` (seconds; None: blocks sized for throughput) decodes in blocks that short.

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
        return self._decode_blocks(header, chunks, lengths, sample_rate, channels, progress, salvage, latency)

    def _decode_blocks(self, header: EcdcHeader, chunks: Iterator[CodeChunk | Gap],
                       lengths: Callable[[], tuple[int | None, int | None]],
                       sample_rate: int | None, channels: int | None,
                       progress: ProgressFn | None,
                       salvage: EcdcReader | None = None, latency: float | None = None) -> Iterator[np.ndarray]:
        out_rate, out_channels = self.output_format(header, sample_rate, channels)
        coded_channels = header.channels * header.streams
        in_layout, out_layout = audio.coded_layout(header), audio.decoded_layout(header, channels)
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
                yield audio.remix(wav[:, start:start + out_block], in_layout, out_layout)

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
                decoder = StreamingDecoder(self.model, **engine_seconds(latency))
            # A segment is decoded whole (the reader bounds it to one segment's frames); a
            # run of frames goes in bounded pieces (fewer frames the more streams decode
            # side by side), which the streaming decoder turns into the same audio.
            n_frames = chunk.codes.shape[-1]
            step = n_frames if header.segmented else max(1, _PUSH_FRAMES // header.streams)
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
        separate = stereo in ("dual", "separate")
        if self.channels > 1:
            if separate:
                raise ModelError(f"--stereo {stereo} is for mono models; {self.name!r} codes "
                                 f"{self.channels} channels jointly")
            return StereoMode.JOINT, self.channels
        if channels == 1:
            return StereoMode.MONO, 1
        if separate:
            if self.model.config.normalize:
                raise ModelError(f"--stereo {stereo} is not available for {self.name!r} (per-segment scaling)")
            if channels > MAX_SEPARATE_STREAMS:
                raise AudioError(f"the audio has {channels} channels; --stereo {stereo} codes at most "
                                 f"{MAX_SEPARATE_STREAMS} (use --stereo downmix)")
            # Two channels stay DUAL, the mode every reader of format 1.0 knows.
            return (StereoMode.DUAL if channels == 2 else StereoMode.SEPARATE), channels
        return StereoMode.DOWNMIX, 1

    def _segment(self, codes: np.ndarray, scale: float | None) -> EncodedSegment:
        tensor = torch.from_numpy(codes.astype(np.int64)).to(self.device)
        scale_t = None
        if scale is not None:
            scale_t = torch.full((codes.shape[0],), float(scale), dtype=torch.float32, device=self.device)
        return EncodedSegment(tensor, scale_t)


def _write_stream(events: Iterator[EcdcHeader | CodeChunk | _Totals], out: BinaryIO,
                  keep: list[CodeChunk] | None = None, tags: Mapping[str, str] | None = None) -> StreamResult:
    """Write the encoder's events as a .ecdc stream, flushing each chunk as it comes."""
    writer: EcdcWriter | None = None
    result: StreamResult | None = None
    flush = getattr(out, "flush", None)
    for item in events:
        if isinstance(item, EcdcHeader):
            writer = EcdcWriter(out, item, tags)
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
    the release that wrote it, whichever release is the default now. A file made with
    ``--checkpoint`` (a name ecdc does not know, or weights other than those of the name)
    decodes with a checkpoint of that name in the cache whose weights are the file's
    (:func:`~ecdc.weights.cached_checkpoints`); without one, the error says to pass the
    same ``--checkpoint``.
    """
    if model is not None or checkpoint is not None:
        return load_model(model, device=device, checkpoint=checkpoint, progress=progress)
    name = header.model_name
    wanted = header.weights_fingerprint if header.weights_fingerprint != UNKNOWN_FINGERPRINT else None
    if weights.is_known(name) and not weights.holds_other_weights(name, wanted):
        codec = load_model(name, device=device, progress=progress)
        if wanted is None or codec.fingerprint == wanted:
            return codec
    for path in weights.cached_checkpoints(name):
        try:
            found = load_model(None, device=device, checkpoint=str(path))
        except EcdcError:
            continue  # not a checkpoint that loads: not this file's
        if (found.fingerprint == wanted) if wanted is not None else (found.name == name):
            return found
    raise ModelError(weights.checkpoint_needed_message(name, wanted))


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
