"""The model-free stages of the codec's streaming pipeline: cutting codes into chunks,
resampling, holding back the tail until the exact length is known, and silence.

Apart from :mod:`ecdc.codec` so that the codec module stays about the model's own work;
each stage works on bounded blocks, so memory does not grow with the input.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import soxr
import torch

from .container import CodeChunk
from .models.encodec import EncodedSegment

SILENCE_BLOCK = 1 << 16  # samples of silence per block for a salvaged gap (a gap may be days long)


class Chunker:
    """Cuts the encoder's output into container chunks, as the whole-file path always has.

    Segmented models: one chunk per segment (with its scale). Unsegmented ones: runs of
    frames regrouped into chunks of ``per_chunk`` frames (about one second); ``eager``
    (low latency) sends what the encoder gave at once instead, in chunks of at most
    ``per_chunk`` frames, so that no frame waits for the next block's.
    """

    def __init__(self, per_chunk: int, segmented: bool, eager: bool = False):
        self.per_chunk = per_chunk
        self.segmented = segmented
        self.eager = eager
        self._codes: list[np.ndarray] = []
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
        if self.eager:
            yield from self._cut(final=True)

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


class LengthFitter:
    """Passes audio through, holding back the tail until the exact output length is known.

    Once ``target`` is set (at the end), the output is trimmed or zero-padded to exactly
    that many samples; without a target everything passes unchanged.
    """

    def __init__(self, channels: int, margin: int):
        self.channels = channels
        self.margin = margin
        self.target: int | None = None
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
        for block in silence(self.channels, pad):
            self._emitted += block.shape[1]
            yield block


def silence(channels: int, num_samples: int) -> Iterator[np.ndarray]:
    """``num_samples`` of silence in bounded blocks: a salvaged gap may be days long."""
    zeros = np.zeros((channels, min(SILENCE_BLOCK, max(0, num_samples))), dtype=np.float32)
    for start in range(0, num_samples, SILENCE_BLOCK):
        yield zeros[:, :min(SILENCE_BLOCK, num_samples - start)]


def resample_chunk(resampler: soxr.ResampleStream, wav: np.ndarray, last: bool) -> np.ndarray:
    """Streaming libsoxr on ``[C, n]`` audio; bit-identical to resampling it whole."""
    out = resampler.resample_chunk(np.ascontiguousarray(wav.T, dtype=np.float32), last=last)
    return np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(-1, wav.shape[0]).T)


def flat(out: torch.Tensor) -> np.ndarray:
    """Decoder output ``[B, C, n]`` -> ``[B*C, n]`` float32 (DUAL stacks the two streams)."""
    arr = out.to("cpu").numpy()
    return np.ascontiguousarray(arr.reshape(arr.shape[0] * arr.shape[1], arr.shape[-1]), dtype=np.float32)
