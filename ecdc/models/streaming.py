"""Encode and decode audio of any length in bounded memory, block by block.

The streamed codes are *identical* to :meth:`EncodecModel.encode` on the whole input and
the streamed audio matches :meth:`EncodecModel.decode` (to float rounding for causal
models, bit for bit for segmented ones), so a file coded in pieces is the file coded at
once. Two kinds of model, two strategies:

* **Causal, unsegmented** (the 24 kHz model). The networks are split at their LSTM. The
  convolutions before it have a finite receptive field, so each internal block of frames
  ``[a, b)`` is computed from the input window ``[a*hop - context, b*hop)`` and only its
  last ``b - a`` (exact) frames are kept; the LSTM carries its ``(h, c)`` state from block
  to block; the convolutions after it get the previous block's last frames as left
  history. Windows start on multiples of the hop, so every strided layer keeps its
  alignment, and the last block's end-of-file padding is the whole-file one. Internal
  blocks (``block_seconds``) are independent of how much the caller pushes at a time.
  Low latency (:func:`engine_seconds`): blocks and chunks may be as short as ``MIN_ROWS``
  frames (0.21 s at 75 Hz), each call widened to the left to its full size over audio
  already coded (so a 0.5 s block costs about twice the compute of long ones). Only the
  encoder's *first* block must be long (for the 24 kHz models 0.87-1.1 s of audio on one
  thread, more with more threads, as :func:`~ecdc.models.windows.min_input_width`
  says): an input of that length is coded in the long-pass regime, a shorter one in one
  whole-file call at the end, and codes sent early cannot be taken back. The decoder has no such
  floor (its audio need only match to float rounding): a call with too little history is
  zero-padded on the right instead (:func:`~ecdc.models.windows.run_min_width`).
  The sample-rate layers (the encoder's convolutions before the LSTM, the decoder's
  after it) hold most of the activations and run on short blocks; the frame-rate ones
  (LSTM, quantiser, the convolutions beside them) hold little per second but pay a fixed
  cost per call, so they run on longer chunks (``chunk_seconds``) of the same frames.

* **Segmented** (the 48 kHz model). Segments are encoded as soon as they are complete,
  grouped into batched passes exactly as :meth:`EncodecModel.encode` / ``decode`` group
  them (:mod:`ecdc.models.batching`), and the decoded segments are overlap-added
  incrementally with the same weights and order of additions as
  :func:`linear_overlap_add`; samples are released once no later segment can touch them.

Why identical codes need more than equal maths: CPU kernels round differently depending
on the shape of the call, and a 1e-7 difference flips near-ties in deep RVQ stages. For a
batch of one, PyTorch convolves with oneDNN only when ``channels_in * width > 20480``
(``ONEDNN_MIN_ELEMENTS``) and otherwise with a GEMM fallback that rounds differently;
MKL's GEMM rounds differently for fewer than ~8 rows, the LSTM for a single time step.
Above those sizes results are the same at every position whatever the width, so each
call here is kept in the regime of a long whole-file pass: windows are wide enough for
every conv (a short last block is widened to the left, recomputing frames already sent),
the last LSTM chunk is zero-padded to ``MIN_ROWS`` steps (it is causal) and the
quantiser gets at least ``MIN_ROWS`` frames. Inputs shorter than one block are coded
by one whole-file call, identical by definition. That window geometry is in
:mod:`ecdc.models.windows`; this module holds the two stateful engines.

Measured on CPU (1, 2, 4 and 8 threads; 24 kHz model with realistic codebooks, lengths
from 1 sample to 30 s, pushes of 1 sample to 2 s, blocks of 1 to 10 s, batch 1 and 2):
codes identical every time; decoded audio within 6e-8 of the whole-file decode (its
transposed convolutions are not shift-invariant to the last bit). Caveat: the last
``chunk % 16`` elements of each thread's chunk of an ELU take a scalar path that rounds
differently. Windows are sized so that every ELU is split over all threads (see
:func:`~ecdc.models.windows.min_input_width`, sized for the thread count at
construction); when that count divides the channel counts (1, 2, 4, 8, 16 for the
official models) the chunks follow channel boundaries and the odd elements sit at the
same places in both passes. With other counts (e.g. 3) the whole-file pass itself is not
shift-invariant: a rare deep code can then differ (2 of 8 long inputs at 3 threads). On
CUDA the same windows are used, but cuDNN's algorithm choice per shape is not controlled
here (untested).
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .batching import Runs, audio_key, codes_key
from .encodec import EncodecModel, EncodedSegment
from .seanet import run_layers
from .windows import (
    MIN_ROWS,
    history_to_use,
    left_context,
    lstm_step,
    min_input_width,
    run_min_width,
    split_at_lstm,
    with_history,
)

# Audio per block: 2 s keeps a block's activations (and so peak memory) small while each
# conv and GEMM call is still large enough to run at full speed on oneDNN/MKL.
DEFAULT_BLOCK_SECONDS = 2.0
# The decoder's activations per second of audio are larger; its blocks are shorter.
DEFAULT_DECODER_BLOCK_SECONDS = 1.0
# The frame-rate layers (LSTM, the convs beside it, the quantiser) hold little data per
# second but pay a fixed cost per call (oneDNN re-packs the LSTM's 8 MB of weights on
# every call: ~15 ms, as much as 110 of its time steps), so they run on longer chunks.
DEFAULT_CHUNK_SECONDS = 10.0


def engine_seconds(latency: float | None) -> dict[str, float]:
    """``block_seconds`` and ``chunk_seconds`` for either engine: the throughput defaults
    for None, else blocks and chunks of ``latency`` seconds (0: the smallest the engine
    takes). Codes are the same either way; small blocks recompute more per second."""
    if latency is None:
        return {}
    if not latency >= 0:
        raise ValueError(f"latency must be >= 0, got {latency}")
    seconds = max(float(latency), 1e-3)  # the engines round up to their smallest blocks
    return {"block_seconds": seconds, "chunk_seconds": seconds}


def _check_seconds(**lengths: float) -> None:
    for name, value in lengths.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _streamable(model: EncodecModel) -> None:
    if model.segment_length is not None:
        return
    if not model.config.causal:
        raise ModelError(f"{model.name}: streaming needs a causal or a segmented model")
    if model.config.normalize:
        raise ModelError(f"{model.name}: a whole-input scale cannot be streamed; use segments")


class _InputBuffer:
    """Samples ``[B, C, n]`` from absolute position ``start`` on, appended in pieces.

    Pieces are only joined when read, so many tiny pushes cost no repeated copying.
    """

    def __init__(self) -> None:
        self.start = 0
        self.end = 0
        self._pieces: list[torch.Tensor] = []

    def append(self, wav: torch.Tensor) -> None:
        if wav.shape[-1]:
            if self._pieces and wav.shape[:-1] != self._pieces[0].shape[:-1]:
                raise ModelError(f"audio shape changed mid-stream: {list(self._pieces[0].shape[:-1])} "
                                 f"then {list(wav.shape[:-1])}")
            self._pieces.append(wav)
            self.end += wav.shape[-1]

    def _joined(self) -> torch.Tensor:
        if len(self._pieces) > 1:
            self._pieces = [torch.cat(self._pieces, dim=-1)]
        return self._pieces[0]

    def read(self, a: int, b: int) -> torch.Tensor:
        """Samples ``[a, b)`` (absolute positions)."""
        if not self.start <= a <= b <= self.end:
            raise RuntimeError(f"internal error: [{a}, {b}) outside the buffer [{self.start}, {self.end})")
        return self._joined()[..., a - self.start : b - self.start]

    def drop_before(self, pos: int) -> None:
        """Forget samples before ``pos``."""
        pos = min(max(pos, self.start), self.end)
        if pos == self.start:
            return
        if self._pieces:
            self._pieces = [self._joined()[..., pos - self.start :].clone()]
        self.start = pos

    def numel(self) -> int:
        return sum(p.numel() for p in self._pieces)


def _numel(*items: torch.Tensor | tuple[torch.Tensor, ...] | None) -> int:
    total = 0
    for item in items:
        if isinstance(item, torch.Tensor):
            total += item.numel()
        elif isinstance(item, tuple):
            total += sum(t.numel() for t in item)
    return total


def _segments_per_pass(model: EncodecModel) -> int:
    """Segments :meth:`EncodecModel.encode` / ``decode`` stack into one pass (1: no batching).

    The streaming classes group segments the same way, so that their results are the
    whole-file ones bit for bit even where a batched pass rounds differently.
    """
    if not (hasattr(model, "encode_segments") and hasattr(model, "decode_segments")):
        return 1
    return max(1, int(getattr(model, "DEFAULT_BATCH_SEGMENTS", 1)))


# --------------------------------------------------------------------------- encoder


class StreamingEncoder:
    """Push audio in pieces of any size, get the codes :meth:`EncodecModel.encode` would give.

    For causal models each returned :class:`EncodedSegment` holds a run of consecutive
    frames (``scale`` None); their concatenation over all :meth:`push` and :meth:`flush`
    calls is the whole-file segment. For segmented models each returned segment is one of
    the whole-file segments, with its scale.
    """

    def __init__(self, model: EncodecModel, num_codebooks: int,
                 block_seconds: float = DEFAULT_BLOCK_SECONDS,
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS) -> None:
        _streamable(model)
        model.check_num_codebooks(num_codebooks)
        _check_seconds(block_seconds=block_seconds, chunk_seconds=chunk_seconds)
        self.model = model
        self.num_codebooks = num_codebooks
        self.num_samples = 0
        self._buf = _InputBuffer()
        self._done = False
        self._seg_len = model.segment_length
        self._seg_stride = model.segment_stride
        self._next = 0  # causal: next frame to emit; segmented: next segment's start sample
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None  # LSTM (h, c)
        # Inputs of the layers after the LSTM (its outputs, after the skip; [T, B, C]) kept
        # as their history; without an LSTM, the latents ([B, C, T]).
        self._hist: torch.Tensor | None = None
        self._feats: list[torch.Tensor] = []  # exact stack outputs not yet past the LSTM
        self._feat_frames = 0
        self._run_pieces = Runs(_segments_per_pass(model), audio_key)
        if self._seg_len is not None:
            return
        hop = model.hop_length
        self._hop = hop
        threads = torch.get_num_threads()  # window sizes depend on it (see min_input_width)
        self._stack, self._lstm, self._tail = split_at_lstm(model.require("encoder").model)
        # Input context (whole frames, so strided layers stay aligned) and the smallest
        # window, in samples, that keeps every conv of the first part on oneDNN.
        self._context = left_context(self._stack) * hop
        self._min_window = -(-min_input_width(self._stack, threads) // hop) * hop
        tail_reach = left_context(self._tail)
        self._tail_reach = tail_reach
        # LSTM outputs kept for the tail: its reach, plus enough frames that a one-frame
        # final block still gives the tail convs and the quantiser full-size calls.
        self._history = tail_reach + max(min_input_width(self._tail, threads), MIN_ROWS)
        # The first block must be long enough that an input of that length is coded in the
        # regime of a long pass (a shorter one is coded whole at the end instead): its
        # window, the tail's call and the quantiser's are then all full-size. Later blocks
        # may be as short as the LSTM's and the quantiser's smallest calls (low latency):
        # their windows are widened to the left over samples already coded.
        first_block = max(-(-self._min_window // hop), min_input_width(self._tail, threads), MIN_ROWS,
                          tail_reach + 1)
        self.block_frames = max(MIN_ROWS, tail_reach + 1, round(block_seconds * model.frame_rate))
        self.first_frames = max(first_block, self.block_frames)
        # The layers from the LSTM on run on chunks of this many frames.
        self.chunk_frames = max(self.block_frames, round(chunk_seconds * model.frame_rate))
        self._keep = max(self._context, self._min_window)  # samples kept before frame _next

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def push(self, wav: torch.Tensor) -> list[EncodedSegment]:
        """Add ``wav`` ``[B, C, n]`` (any n >= 0) and return the codes that are now final."""
        if self._done:
            raise ModelError("push after flush")
        self._check(wav)
        # A copy: the caller may reuse its buffer for the next piece.
        self._buf.append(wav.to(self.model._device(), copy=True))
        self.num_samples += wav.shape[-1]
        if self._seg_len is not None:
            return self._segments(final=False)
        out = []
        while (self._next + self._block_size()) * self._hop <= self.num_samples:
            self._stack_block(self._block_size(), final=False)
            while self._feat_frames >= self._chunk_size():
                out.append(self._frame_chunk(self._chunk_size(), final=False))
        return out

    @torch.inference_mode()
    def flush(self) -> list[EncodedSegment]:
        """End of input: the remaining codes, padded exactly as in the whole-file pass."""
        if self._done:
            raise ModelError("flush called twice")
        self._done = True
        if self._seg_len is not None:
            return self._segments(final=True)
        if self.num_samples == 0:
            return []
        if self._next == 0:
            # Nothing sent yet, so the buffer still starts at sample 0: this *is* the
            # whole-file pass (also the only way to match it for very short inputs).
            seg = self.model.encode_segment(self._buf.read(0, self.num_samples), self.num_codebooks)
            self._release()
            return [seg]
        total_frames = -(-self.num_samples // self._hop)
        if total_frames > self._next:
            self._stack_block(total_frames - self._next, final=True)
        out = []
        while self._feat_frames > self._chunk_size():
            out.append(self._frame_chunk(self._chunk_size(), final=False))
        if self._feat_frames:
            out.append(self._frame_chunk(self._feat_frames, final=True))
        self._release()
        return out

    def buffered_elements(self) -> int:
        """Tensor elements held between calls; bounded, whatever the input length."""
        return (self._buf.numel() + _numel(self._hist, self._state, *self._feats)
                + sum(w.numel() for w in self._run_pieces.items))

    # ------------------------------------------------------------------ internals

    def _check(self, wav: torch.Tensor) -> None:
        if not isinstance(wav, torch.Tensor) or wav.dim() != 3 or wav.shape[1] != self.model.channels:
            shape = list(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise ModelError(f"{self.model.name} expects audio shaped [batch, {self.model.channels}, "
                             f"samples], got {shape}")
        if not wav.is_floating_point():
            raise ModelError(f"audio must be floating point, got {wav.dtype}")

    def _block_size(self) -> int:
        """Frames of the next block: the first is long enough to be full-size on its own."""
        return self.first_frames if self._next == 0 else self.block_frames

    def _chunk_size(self) -> int:
        """Frames of the next chunk past the LSTM: the first has no history to widen its
        calls with, so it takes the whole first block."""
        return self.chunk_frames if self._hist is not None else max(self.chunk_frames, self.first_frames)

    def _release(self) -> None:
        self._buf = _InputBuffer()
        self._hist = None
        self._state = None
        self._feats, self._feat_frames = [], 0

    def _segments(self, final: bool) -> list[EncodedSegment]:
        """Encode the segments that are complete (all that are left if ``final``)."""
        seg_len, stride = self._seg_len or 0, self._seg_stride or 0
        out: list[EncodedSegment] = []
        while self._next + seg_len <= self.num_samples or (final and self._next < self.num_samples):
            end = min(self._next + seg_len, self.num_samples)
            piece = self._buf.read(self._next, end).clone()
            for run in self._run_pieces.add(piece):
                out += self._encode_run(run)
            self._next += stride
            self._buf.drop_before(self._next)
        if final:
            out += self._encode_run(self._run_pieces.close_run())
            self._release()
        return out

    def _encode_run(self, run: list[torch.Tensor]) -> list[EncodedSegment]:
        if len(run) > 1:
            return self.model.encode_segments(run, self.num_codebooks)
        return [self.model.encode_segment(w, self.num_codebooks) for w in run]

    def _stack_block(self, frames: int, final: bool) -> None:
        """Run the layers before the LSTM for frames ``[_next, _next + frames)``; ``final``
        when they reach the end of the input. The exact frames wait for the LSTM."""
        hop = self._hop
        a = self._next
        end = self.num_samples if final else (a + frames) * hop
        # Left context for exactness, widened (on frame boundaries) to the minimum window.
        start = max(0, min(a * hop - self._context, (end - self._min_window) // hop * hop))
        feats = run_layers(self._stack, self._buf.read(start, end))
        # A copy of the exact frames, so that the rest of the window can be freed.
        self._feats.append(feats[..., -frames:].clone() if feats.shape[-1] > frames else feats)
        self._feat_frames += frames
        self._next = a + frames
        self._buf.drop_before(self._next * hop - self._keep)

    def _take_feats(self, frames: int) -> torch.Tensor:
        feats = torch.cat(self._feats, dim=-1) if len(self._feats) > 1 else self._feats[0]
        rest = feats[..., frames:]
        self._feats = [rest] if rest.shape[-1] else []
        self._feat_frames -= frames
        return feats[..., :frames]

    def _frame_chunk(self, frames: int, final: bool) -> EncodedSegment:
        """Codes of the next ``frames`` waiting frames; ``final`` when they are the last."""
        feats = self._take_feats(frames)
        spoilt = 0 if self._hist is None else self._tail_reach
        use = history_to_use(self._tail_reach, self._history, frames)
        if self._lstm is None:
            latent, self._hist = with_history(self._hist, feats, self._history, use, dim=-1)
            latent = run_layers(self._tail, latent)
        else:
            y, self._state = lstm_step(self._lstm, feats, self._state, last=final)
            # Time-major, so that the layers after the LSTM see the memory layout they see
            # in the whole-file pass (an ELU's scalar tail rounds differently).
            z, self._hist = with_history(self._hist, y, self._history, use, dim=0)
            latent = run_layers(self._tail, z.permute(1, 2, 0))
        # The quantiser gets at least MIN_ROWS frames (recomputing some already sent) when
        # there are that many exact ones: leading frames spoilt by the window start are not.
        rows = min(latent.shape[-1] - spoilt, max(frames, MIN_ROWS))
        codes = self.model.quantizer.encode(latent[..., -rows:], self.num_codebooks)[..., -frames:]
        return EncodedSegment(codes=codes, scale=None)


# --------------------------------------------------------------------------- decoder


class StreamingDecoder:
    """Push :class:`EncodedSegment` s as they come, get audio as soon as it is final.

    The concatenation of everything returned by :meth:`push` and :meth:`flush` equals
    :meth:`EncodecModel.decode` on all segments (to float rounding), untrimmed.
    """

    def __init__(self, model: EncodecModel, block_seconds: float = DEFAULT_DECODER_BLOCK_SECONDS,
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS) -> None:
        _streamable(model)
        _check_seconds(block_seconds=block_seconds, chunk_seconds=chunk_seconds)
        self.model = model
        self._done = False
        self._shape: tuple[int, ...] | None = None  # (B, K) of the codes
        self._seg_stride = model.segment_stride
        # segmented: overlap-add state
        self._index = 0  # segments overlap-added
        self._run_segments = Runs(_segments_per_pass(model), codes_key)
        self._weight: torch.Tensor | None = None
        self._acc: torch.Tensor | None = None  # weighted sum from _emitted on
        self._wsum: torch.Tensor | None = None
        self._emitted = 0
        # causal: pending codes, LSTM state, the histories of the two windowed parts and
        # the LSTM's outputs waiting for the layers after it ([T, B, C]; without an LSTM,
        # the latents, [B, C, T])
        self._codes: list[torch.Tensor] = []
        self._pending = 0
        self._decoded = 0  # frames through the LSTM so far
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lat_hist: torch.Tensor | None = None
        self._y_hist: torch.Tensor | None = None
        self._mid: list[torch.Tensor] = []
        self._mid_frames = 0
        if self._seg_stride is not None:
            return
        hop = model.hop_length
        self._hop = hop
        threads = torch.get_num_threads()
        self._pre, self._lstm, self._post = split_at_lstm(model.require("decoder").model)
        if self._lstm is None:  # no LSTM: everything is after the (absent) pivot
            self._pre, self._post = [], self._pre
        self._pre_reach = left_context(self._pre)
        post_samples = left_context(self._post)
        self._post_reach = -(-post_samples // hop)
        # Frames kept before each part: its reach, plus enough that a one-frame final
        # block still makes full-size calls. Without an LSTM the latents feed everything.
        self._post_history = self._post_reach + min_input_width(self._post, threads)
        self._pre_history = self._pre_reach + min_input_width(self._pre, threads)
        # The layers after the LSTM run on blocks of this many frames; the quantiser, the
        # LSTM and the layers before it on chunks. Either may be short (low latency): a
        # call is widened with history to its part's full size, and one that has too
        # little history (at the start) is zero-padded on the right instead
        # (:func:`~ecdc.models.windows.run_min_width`). Chunks are at least the LSTM's
        # smallest call, so that the state it carries is a long pass's.
        self._pre_width = min_input_width(self._pre, threads)
        self._post_width = min_input_width(self._post, threads)
        self.block_frames = max(MIN_ROWS, self._post_reach + 1, round(block_seconds * model.frame_rate))
        self.chunk_frames = max(MIN_ROWS, self._pre_reach + 1, round(chunk_seconds * model.frame_rate))

    @torch.inference_mode()
    def push(self, segment: EncodedSegment) -> torch.Tensor:
        """Add one segment (or run of frames); return the audio ``[B, C, n]`` final so far."""
        if self._done:
            raise ModelError("push after flush")
        codes = self._check(segment)
        if self._seg_stride is not None:
            pieces = [self._overlap_add(frame) for run in self._run_segments.add(segment)
                      for frame in self._decode_run(run)]
            return self._cat(pieces)
        if segment.scale is not None:
            raise ModelError(f"{self.model.name} does not use scales")
        if codes.shape[-1]:
            self._codes.append(codes.clone())
            self._pending += codes.shape[-1]
        out = []
        while self._pending >= self.chunk_frames:
            self._frame_chunk(self.chunk_frames, final=False)
            while self._mid_frames >= self.block_frames:
                out.append(self._post_block(self.block_frames))
        return self._cat(out)

    @torch.inference_mode()
    def flush(self) -> torch.Tensor:
        """The rest of the audio (not trimmed: the caller knows the true length)."""
        if self._done:
            raise ModelError("flush called twice")
        self._done = True
        if self._seg_stride is not None:
            pieces = [self._overlap_add(frame) for frame in self._decode_run(self._run_segments.close_run())]
            pieces.append(self._overlap_add(None))
            return self._cat(pieces)
        out = []
        if self._decoded == 0 and 0 < self._pending < self.block_frames:
            # Less than a block in all: one whole-file call, identical by definition.
            out.append(self.model.decode_segment(EncodedSegment(self._take(self._pending), None)))
        while self._pending:
            frames = min(self._pending, self.chunk_frames)
            self._frame_chunk(frames, final=frames == self._pending)
        while self._mid_frames:
            frames = self._mid_frames if self._mid_frames <= self.block_frames else self.block_frames
            out.append(self._post_block(frames))
        self._lat_hist = self._y_hist = self._state = None
        return self._cat(out)

    def buffered_elements(self) -> int:
        """Tensor elements held between calls; bounded, whatever the input length."""
        return (sum(c.numel() for c in self._codes)
                + _numel(self._lat_hist, self._y_hist, self._state, self._acc, self._wsum, self._weight,
                         *self._mid)
                + sum(seg.codes.numel() for seg in self._run_segments.items))

    # ------------------------------------------------------------------ internals

    def _check(self, segment: EncodedSegment) -> torch.Tensor:
        codes = segment.codes
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.model.max_codebooks:
            raise ModelError(f"codes must be [batch, <= {self.model.max_codebooks}, frames], "
                             f"got {list(codes.shape)}")
        if self._shape is None:
            self._shape = tuple(codes.shape[:2])
        elif tuple(codes.shape[:2]) != self._shape:
            raise ModelError(f"codes shape changed mid-stream: {list(self._shape)} then "
                             f"{list(codes.shape[:2])}")
        return codes.to(self.model._device())

    def _empty(self) -> torch.Tensor:
        batch = self._shape[0] if self._shape is not None else 0
        dtype = self.model.quantizer.vq.layers[0].codebook.dtype
        return torch.zeros(batch, self.model.channels, 0, device=self.model._device(), dtype=dtype)

    def _cat(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        if not pieces:
            return self._empty()
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def _take(self, frames: int) -> torch.Tensor:
        codes = torch.cat(self._codes, dim=-1) if len(self._codes) > 1 else self._codes[0]
        taken, rest = codes[..., :frames], codes[..., frames:]
        self._codes = [rest] if rest.shape[-1] else []
        self._pending -= frames
        return taken

    def _frame_chunk(self, frames: int, final: bool) -> None:
        """The next ``frames`` codes through the quantiser, the LSTM and the layers before
        it; ``final`` when they are the last. The results wait for :meth:`_post_block`."""
        try:
            lat = self.model.quantizer.decode(self._take(frames).long())
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        if self._lstm is None:
            self._mid.append(lat)
        else:
            x, self._lat_hist = with_history(self._lat_hist, lat, self._pre_history,
                                             history_to_use(self._pre_reach, self._pre_history, frames),
                                             dim=-1)
            z = run_min_width(self._pre, x, self._pre_width)[..., -frames:]
            y, self._state = lstm_step(self._lstm, z, self._state, last=final)
            self._mid.append(y)
        self._mid_frames += frames
        self._decoded += frames

    def _post_block(self, frames: int) -> torch.Tensor:
        """Audio of the next ``frames`` waiting frames (a short last block is widened like
        any short one, with history)."""
        dim = -1 if self._lstm is None else 0
        mid = torch.cat(self._mid, dim=dim) if len(self._mid) > 1 else self._mid[0]
        y, rest = mid.narrow(dim, 0, frames), mid.narrow(dim, frames, mid.shape[dim] - frames)
        self._mid = [rest] if rest.shape[dim] else []
        self._mid_frames -= frames
        y_all, self._y_hist = with_history(self._y_hist, y, self._post_history,
                                           history_to_use(self._post_reach, self._post_history, frames),
                                           dim=dim)
        # Time-major after the LSTM ([T, B, C], run as its [B, C, T] view).
        return run_min_width(self._post, y_all, self._post_width, dim=dim, scale=self._hop)[..., -frames * self._hop:]

    def _decode_run(self, run: list[EncodedSegment]) -> list[torch.Tensor]:
        if len(run) > 1:
            return self.model.decode_segments(run)
        return [self.model.decode_segment(seg) for seg in run]

    def _overlap_add(self, frame: torch.Tensor | None) -> torch.Tensor:
        """Add one decoded segment; return the samples no later segment can change.
        ``None``: end of stream, return everything left.

        Same weights and the same order of additions as :func:`linear_overlap_add`, so the
        result is bit-identical to it.
        """
        stride = self._seg_stride or 0
        if frame is not None:
            n = frame.shape[-1]
            if self._weight is None:
                t = torch.linspace(0, 1, n + 2, device=frame.device, dtype=frame.dtype)[1:-1]
                self._weight = 0.5 - (t - 0.5).abs()
            elif n > self._weight.shape[0]:
                raise ModelError("every segment must be at most as long as the first")
            if self._acc is None or self._wsum is None:
                self._acc, self._wsum = frame.new_zeros(*frame.shape[:-1], 0), frame.new_zeros(0)
            acc, wsum = self._acc, self._wsum
            start = self._index * stride - self._emitted
            if start < 0 or acc.shape[:-1] != frame.shape[:-1]:
                raise ModelError("segment does not fit the stream")
            grow = start + n - acc.shape[-1]
            if grow > 0:
                acc = torch.cat([acc, acc.new_zeros(*acc.shape[:-1], grow)], dim=-1)
                wsum = torch.cat([wsum, wsum.new_zeros(grow)])
            acc[..., start : start + n] += self._weight[:n] * frame
            wsum[start : start + n] += self._weight[:n]
            self._acc, self._wsum = acc, wsum
            self._index += 1
        if self._acc is None or self._wsum is None:
            return self._empty()
        acc, wsum = self._acc, self._wsum
        # Later segments start at _index * stride or after: everything before is final.
        ready = acc.shape[-1] if frame is None else min(acc.shape[-1], self._index * stride - self._emitted)
        if ready <= 0:
            return acc[..., :0].clone()
        if bool((wsum[:ready] <= 0).any()):
            raise ModelError(f"stride {stride} leaves gaps between segments")
        out = acc[..., :ready] / wsum[:ready]
        self._acc, self._wsum = acc[..., ready:].clone(), wsum[ready:].clone()
        self._emitted += ready
        return out
