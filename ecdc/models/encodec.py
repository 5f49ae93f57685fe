"""The EnCodec model (encoder, RVQ, decoder) and the configurations Meta released.

Only tensors in, tensors out: reading audio, weights and .ecdc files is done elsewhere.
Submodule names match Meta's ``encodec.EncodecModel`` so its checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, cast, overload

import torch
from torch import nn

from ..choices import format_kbps
from ..container import (
    MAX_BITS,
    MAX_CODEBOOKS,
    MAX_HOP_LENGTH,
    MAX_MODEL_CHANNELS,
    MAX_NAME_BYTES,
    MAX_SAMPLE_RATE,
    MAX_SEGMENT_LENGTH,
)
from ..errors import ModelError
from ..perf import tune_allocator
from .batching import audio_key, codes_key, encode_batched, runs
from .modules import CONV_NORMS
from .quantizer import ResidualVectorQuantizer
from .seanet import SEANetDecoder, SEANetEncoder, run_layers_batched

#: Bounds of an :class:`EncodecConfig`. Where a field reaches a file's header they are the
#: .ecdc format's own limits (ecdc.container); elsewhere far beyond any real codec. A config
#: comes from untrusted checkpoints, and what it asks for (codebooks, layers, widths) is
#: built before the weights can be compared with it: bounded, that costs milliseconds.
MIN_SAMPLE_RATE = 1000
MAX_BANDWIDTHS = 64
MAX_RATIOS = 16
MAX_LAYERS = 16  # n_residual_layers, lstm_layers
MAX_WIDTH = 1 << 16  # channels of the widest layer (n_filters * 2 ** len(ratios)) and dimension
MAX_BANDWIDTH_KBPS = 0xFFFFFFFF / 1000  # what a header's bandwidth field holds


def _show(value: Any) -> str:
    """A value for a one-line error message: repr, cut short (configs come from hostile files)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__} of {value.bit_length() if _is_int(value) else '?'} bits>"
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a finite real number (or a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class EncodecConfig:
    """Everything needed to build an :class:`EncodecModel`; JSON-able via :meth:`to_dict`."""

    name: str
    sample_rate: int
    channels: int
    causal: bool
    norm: str  # "weight_norm" | "time_group_norm"
    bandwidths: tuple[float, ...]  # kbps, ascending
    normalize: bool  # scale each segment to unit RMS (48 kHz model)
    segment: float | None  # seconds; None = encode the whole input at once
    overlap: float = 0.01
    n_filters: int = 32
    ratios: tuple[int, ...] = (8, 5, 4, 2)
    dimension: int = 128
    n_residual_layers: int = 1
    lstm_layers: int = 2
    codebook_size: int = 1024
    #: residual blocks' shortcut: a 1x1 convolution (Meta's 24/48 kHz) or the identity
    #: (``False``: the 32 kHz model, transformers' ``use_conv_shortcut=False``)
    conv_shortcut: bool = True

    def __post_init__(self) -> None:
        """Check every field's type and range, naming the field, before anything is built.

        Lists (e.g. straight from JSON) are stored as tuples so the config stays hashable;
        strings, bools, NaN and infinities are refused rather than converted.
        """
        problems: list[str] = []

        def integer(field: str, lo: int, hi: int) -> int | None:
            value = getattr(self, field)
            if not _is_int(value) or not lo <= value <= hi:
                problems.append(f"{field} must be an integer in {lo}..{hi}, got {_show(value)}")
                return None
            object.__setattr__(self, field, int(value))
            return int(value)

        def sequence(field: str, most: int) -> tuple | None:
            value = getattr(self, field)
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= most:
                problems.append(f"{field} must be a list of 1..{most} numbers, got {_show(value)}")
                return None
            return tuple(value)

        def flag(field: str) -> None:
            if not isinstance(getattr(self, field), bool):
                problems.append(f"{field} must be true or false, got {_show(getattr(self, field))}")

        if not isinstance(self.name, str):
            problems.append(f"name must be a string, got {_show(self.name)}")
        elif (not 1 <= len(self.name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
              or not self.name.isprintable() or any("\ud800" <= c <= "\udfff" for c in self.name)):
            problems.append(f"name must be 1..{MAX_NAME_BYTES} printable UTF-8 bytes, got {_show(self.name)}")
        sample_rate = integer("sample_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
        integer("channels", 1, MAX_MODEL_CHANNELS)
        flag("causal")
        flag("normalize")
        flag("conv_shortcut")
        if not isinstance(self.norm, str) or self.norm not in CONV_NORMS:
            problems.append(f"norm must be one of {', '.join(CONV_NORMS)}, got {_show(self.norm)}")
        elif self.norm == "time_group_norm" and self.causal is True:
            problems.append("norm time_group_norm cannot be causal")

        bandwidths = sequence("bandwidths", MAX_BANDWIDTHS)
        if bandwidths is not None:
            values = [_as_float(b) for b in bandwidths]
            bad = [b for b, v in zip(bandwidths, values) if v is None or not 0.001 <= v <= MAX_BANDWIDTH_KBPS]
            if bad:
                problems.append(f"bandwidths must be finite numbers in 0.001..{MAX_BANDWIDTH_KBPS:.3f} kbps, "
                                f"got {_show(bad[0])}")
                bandwidths = None
            elif values != sorted(set(cast("list[float]", values))):  # no None: none was bad
                problems.append("bandwidths must be strictly ascending")
                bandwidths = None
            else:
                bandwidths = tuple(values)
                object.__setattr__(self, "bandwidths", bandwidths)

        ratios = sequence("ratios", MAX_RATIOS)
        if ratios is not None:
            if not all(_is_int(r) and r >= 1 for r in ratios):
                problems.append(f"ratios must be positive integers, got {_show(list(ratios))}")
                ratios = None
            elif math.prod(ratios) > MAX_HOP_LENGTH:
                problems.append(f"ratios multiply to a hop of {math.prod(ratios)} samples, over {MAX_HOP_LENGTH}")
                ratios = None
            else:
                ratios = tuple(int(r) for r in ratios)
                object.__setattr__(self, "ratios", ratios)

        n_filters = integer("n_filters", 1, MAX_WIDTH)
        if n_filters is not None and ratios is not None and n_filters << len(ratios) > MAX_WIDTH:
            problems.append(f"n_filters {n_filters} doubled over {len(ratios)} ratios exceeds {MAX_WIDTH} channels")
        integer("dimension", 1, MAX_WIDTH)
        integer("n_residual_layers", 0, MAX_LAYERS)
        integer("lstm_layers", 0, MAX_LAYERS)
        codebook_size = integer("codebook_size", 2, 1 << MAX_BITS)
        if codebook_size is not None and codebook_size & (codebook_size - 1):
            problems.append(f"codebook_size must be a power of two, got {codebook_size}")
            codebook_size = None

        overlap = _as_float(self.overlap)
        if overlap is None or not 0 <= overlap < 1:
            problems.append(f"overlap must be a number in [0, 1), got {_show(self.overlap)}")
        else:
            object.__setattr__(self, "overlap", overlap)
        if self.segment is not None:
            segment = _as_float(self.segment)
            if segment is None or segment <= 0:
                problems.append(f"segment must be a positive number of seconds or null, got {_show(self.segment)}")
            elif sample_rate is not None and not 1 <= segment * sample_rate < MAX_SEGMENT_LENGTH + 1:
                problems.append(f"segment of {segment:g} s is {segment * sample_rate:.3g} samples, "
                                f"outside 1..{MAX_SEGMENT_LENGTH}")
            else:
                object.__setattr__(self, "segment", segment)

        if not problems and not 1 <= self.max_codebooks <= MAX_CODEBOOKS:
            problems.append(f"bandwidths up to {self.bandwidths[-1]:g} kbps need {self.max_codebooks} codebooks "
                            f"at sample_rate {self.sample_rate} (hop {self.hop_length}, {self.bits_per_code}-bit "
                            f"codes), over the {MAX_CODEBOOKS} a file can hold")
        if problems:
            raise ValueError(f"invalid EncodecConfig {_show(self.name)}: " + "; ".join(problems))

    # Geometry every user of a config needs (the model, the weights check), computed without
    # building anything.

    @property
    def hop_length(self) -> int:
        """Samples per frame of codes."""
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def bits_per_code(self) -> int:
        return int(math.log2(self.codebook_size))

    def codebooks_for(self, bandwidth: float) -> int:
        """Codebooks used at ``bandwidth`` kbps (Meta's formula: 24 kbps -> 32 at 24 kHz)."""
        return max(1, int(bandwidth * 1000 // (self.bits_per_code * self.frame_rate)))

    @property
    def max_codebooks(self) -> int:
        """Quantiser layers of the model: the codebooks of the highest bandwidth."""
        return self.codebooks_for(self.bandwidths[-1])

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON types (tuples become lists). ``conv_shortcut`` appears only when
        False (the 32 kHz model): every config written before it existed, released ones
        included, stays the same dict."""
        d = dataclasses.asdict(self)
        d["bandwidths"] = list(self.bandwidths)
        d["ratios"] = list(self.ratios)
        if self.conv_shortcut:
            del d["conv_shortcut"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncodecConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        if not isinstance(d, Mapping):
            raise ValueError(f"an EncodecConfig must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            shown = ", ".join(k if isinstance(k, str) and k.isidentifier() and len(k) <= 40 else _show(k)
                              for k in unknown[:5])
            raise ValueError(f"unknown EncodecConfig keys: {shown}{', ...' if len(unknown) > 5 else ''}")
        try:
            return cls(**d)
        except TypeError as exc:  # missing required keys
            raise ValueError(f"incomplete EncodecConfig: {exc}") from None


ENCODEC_24KHZ = EncodecConfig(
    name="encodec_24khz",
    sample_rate=24_000,
    channels=1,
    causal=True,
    norm="weight_norm",
    bandwidths=(1.5, 3.0, 6.0, 12.0, 24.0),
    normalize=False,
    segment=None,
)

ENCODEC_48KHZ = EncodecConfig(
    name="encodec_48khz",
    sample_rate=48_000,
    channels=2,
    causal=False,
    norm="time_group_norm",
    bandwidths=(3.0, 6.0, 12.0, 24.0),
    normalize=True,
    segment=1.0,
    overlap=0.01,
)


#: The 32 kHz mono model of MusicGen (``facebook/encodec_32khz``, published only in
#: transformers' layout): 50 Hz frames, 2048-entry codebooks (11-bit codes), 4 codebooks at
#: 2.2 kbps, non-causal, unsegmented, identity shortcuts.
ENCODEC_32KHZ = EncodecConfig(
    name="encodec_32khz",
    sample_rate=32_000,
    channels=1,
    causal=False,
    norm="weight_norm",
    bandwidths=(2.2,),
    normalize=False,
    segment=None,
    n_filters=64,
    ratios=(8, 5, 4, 4),
    codebook_size=2048,
    conv_shortcut=False,
)


@dataclass
class ModelOutput:
    """Result of the differentiable training pass :meth:`EncodecModel.forward`."""

    audio: torch.Tensor  # [B, C, T] reconstruction, trimmed to the input length
    codes: torch.Tensor  # [B, n_q, T'] int64
    commitment_loss: torch.Tensor  # scalar, from the RVQ; gradient reaches the encoder only


@dataclass
class EncodedSegment:
    """Codes of one segment and, for normalising models, the RMS it was divided by."""

    codes: torch.Tensor  # [B, K, F] int64
    scale: torch.Tensor | None  # [B] float32, None when the model does not normalise


def linear_overlap_add(frames: Sequence[torch.Tensor], stride: int) -> torch.Tensor:
    """Join overlapping decoded segments ``[..., T_i]`` placed ``stride`` apart.

    Each segment is weighted by a triangle peaking at its middle and the sum is divided by
    the summed weights, so samples covered once pass unchanged and overlaps cross-fade
    linearly. Same weights as Meta's decoder, so outputs match it.
    """
    if not frames:
        raise ValueError("nothing to overlap-add")
    first = frames[0]
    device, dtype = first.device, first.dtype
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    t = torch.linspace(0, 1, first.shape[-1] + 2, device=device, dtype=dtype)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    out = torch.zeros(*first.shape[:-1], total, device=device, dtype=dtype)
    weight_sum = torch.zeros(total, device=device, dtype=dtype)
    for i, frame in enumerate(frames):
        n = frame.shape[-1]
        if n > weight.shape[0]:
            raise ValueError("every segment must be at most as long as the first")
        start = i * stride
        out[..., start : start + n] += weight[:n] * frame
        weight_sum[start : start + n] += weight[:n]
    if bool((weight_sum <= 0).any()):
        raise ValueError(f"stride {stride} leaves gaps between segments")
    return out / weight_sum


class EncodecModel(nn.Module):
    """EnCodec: waveform <-> discrete codes, one :class:`EncodedSegment` per segment.

    Codes are bit-identical to Meta's reference implementation. Decoded audio matches it
    to float rounding; ``exact_decoder=True`` (or :meth:`set_exact_decoder`) makes it
    bit-identical too, at some decoding speed.
    """

    #: Segments (of segmented models) coded in one pass; see :meth:`encode_segments`.
    DEFAULT_BATCH_SEGMENTS = 16
    #: Of those, segments given to each convolution at a time (see :func:`run_layers_batched`).
    CONV_BATCH_SEGMENTS = 4

    # None after release_unused(); use require() where either may be gone.
    encoder: SEANetEncoder | None
    decoder: SEANetDecoder | None

    def __init__(self, config: EncodecConfig, exact_decoder: bool = False) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        self.sample_rate = config.sample_rate
        self.channels = config.channels
        self.bandwidths = config.bandwidths
        self.hop_length = config.hop_length
        self.frame_rate = config.frame_rate
        self.bits_per_code = config.bits_per_code
        common: dict[str, Any] = dict(
            channels=config.channels, dimension=config.dimension, n_filters=config.n_filters,
            n_residual_layers=config.n_residual_layers, ratios=config.ratios, norm=config.norm,
            causal=config.causal, lstm_layers=config.lstm_layers, conv_shortcut=config.conv_shortcut,
        )
        self.max_codebooks = config.max_codebooks
        # Registration order = state-dict key order; Meta's is encoder, quantizer, decoder.
        self.encoder = SEANetEncoder(**common)
        self.quantizer = ResidualVectorQuantizer(config.dimension, self.max_codebooks,
                                                 config.codebook_size)
        # Nothing downstream depends on the decoded audio's last bits (it matches the
        # reference to float rounding), so the decoder uses its faster arithmetic; the
        # encoder stays bit-exact because codes must be identical to the reference's.
        self.decoder = SEANetDecoder(**common, exact=exact_decoder)
        tune_allocator()  # see ecdc.perf: avoids re-faulting activations on every pass

    def release_unused(self, keep: str) -> None:
        """Free what a one-way user never touches: the decoder (``keep="encode"``) or the
        encoder (``keep="decode"``), and the codebooks' training statistics.

        A command-line process converts in one direction only; this takes about a third
        of the weights (~45 MB for the 24 kHz model) off its peak memory. Afterwards the
        model cannot run the other direction, train, or give a complete state dict.
        """
        if keep not in ("encode", "decode"):
            raise ValueError(f"keep must be 'encode' or 'decode', got {keep!r}")
        if keep == "encode":
            self.decoder = None
        else:
            self.encoder = None
        for layer in self.quantizer.vq.layers:
            book = layer._codebook
            book.embed_avg = book.embed_avg.new_empty(0)
            book.cluster_size = book.cluster_size.new_empty(0)
        self._released = keep

    @overload
    def require(self, part: Literal["encoder"]) -> SEANetEncoder: ...
    @overload
    def require(self, part: Literal["decoder"]) -> SEANetDecoder: ...
    def require(self, part: str) -> SEANetEncoder | SEANetDecoder:
        """``self.encoder`` or ``self.decoder``, with a clear error after :meth:`release_unused`."""
        module = getattr(self, part)
        if module is None:
            direction = "decoding" if part == "encoder" else "encoding"
            raise ModelError(f"{self.name}: this model was loaded for {direction} only")
        return module

    def set_exact_decoder(self, exact: bool = True) -> None:
        """Decode with the reference's arithmetic bit for bit (``True``) or with the faster
        formulations that agree with it to float rounding (``False``, the default)."""
        self.require("decoder").set_exact(exact)

    # ------------------------------------------------------------------ geometry

    @property
    def segment_length(self) -> int | None:
        """Samples per segment, or None when the whole input is one segment."""
        if self.config.segment is None:
            return None
        return int(self.config.segment * self.sample_rate)

    @property
    def segment_stride(self) -> int | None:
        """Samples between segment starts (segment length minus the overlap)."""
        length = self.segment_length
        if length is None:
            return None
        return max(1, int((1 - self.config.overlap) * length))

    def _codebooks_for(self, bandwidth: float) -> int:
        return self.config.codebooks_for(bandwidth)

    def num_codebooks(self, bandwidth: float) -> int:
        """Codebooks used at ``bandwidth`` kbps (Meta's formula: 24 kbps -> 32 at 24 kHz)."""
        if bandwidth not in self.bandwidths:
            valid = ", ".join(format_kbps(b) for b in self.bandwidths)
            raise ModelError(f"{self.name} does not support {format_kbps(bandwidth)} kbps; "
                             f"choose one of {valid}", where="")  # about -b, not a file
        return self._codebooks_for(bandwidth)

    # ------------------------------------------------------------------ encode / decode

    def _device(self) -> torch.device:
        return self.quantizer.vq.layers[0].codebook.device

    def encode(self, wav: torch.Tensor, bandwidth: float) -> list[EncodedSegment]:
        """Waveform ``[B, C, T]`` at ``sample_rate`` -> codes, one entry per segment."""
        num_codebooks = self.num_codebooks(bandwidth)
        self._check_wav(wav)
        length = wav.shape[-1]
        seg_len = self.segment_length or length
        stride = self.segment_stride or length
        pieces = [wav[:, :, start : start + seg_len] for start in range(0, length, stride)]
        out: list[EncodedSegment] = []
        for run in runs(pieces, self.DEFAULT_BATCH_SEGMENTS, audio_key):
            out += self.encode_segments(run, num_codebooks)
        return out

    @torch.no_grad()
    def encode_segments(self, wavs: list[torch.Tensor], num_codebooks: int) -> list[EncodedSegment]:
        """:meth:`encode_segment` on several equal-shaped segments in one pass.

        Stacking segments along the batch gives the convolutions bigger calls (see
        :func:`~ecdc.models.batching.encode_batched` for what runs batched and what
        cannot); each item is normalised and coded on its own, so the codes are the ones
        segment-by-segment coding gives, bit for bit.
        """
        if len(wavs) == 1:
            return [self.encode_segment(wavs[0], num_codebooks)]
        # Each segment is normalised on its own (its scale is written to the file, and a
        # batched reduction could round it differently); the network runs once on all.
        prepared = [self._prepare_segment(w, num_codebooks) for w in wavs]
        batch = wavs[0].shape[0]
        x = torch.cat([w for w, _ in prepared], dim=0)
        # Each segment's codes are the one-segment pass's, near-ties included (encode_batched).
        codes = encode_batched(self.require("encoder").model, self.quantizer, x, batch, num_codebooks,
                               self.CONV_BATCH_SEGMENTS * batch)
        return [EncodedSegment(codes=codes[i * batch:(i + 1) * batch], scale=scale)
                for i, (_, scale) in enumerate(prepared)]

    def _check_wav(self, wav: torch.Tensor) -> None:
        if wav.dim() != 3 or wav.shape[1] != self.channels:
            raise ModelError(f"{self.name} expects audio shaped [batch, {self.channels}, samples], "
                             f"got {list(wav.shape)}")
        if wav.shape[-1] == 0:
            raise ModelError("cannot encode empty audio")
        if not wav.is_floating_point():
            raise ModelError(f"audio must be floating point, got {wav.dtype}")

    @torch.no_grad()
    def encode_segment(self, wav: torch.Tensor, num_codebooks: int) -> EncodedSegment:
        """Encode one segment ``[B, C, T]`` (T at most ``segment_length``) with K codebooks."""
        wav, scale = self._prepare_segment(wav, num_codebooks)
        codes = self.quantizer.encode(self.require("encoder")(wav), num_codebooks)
        return EncodedSegment(codes=codes, scale=scale)

    def check_num_codebooks(self, num_codebooks: int) -> None:
        """Refuse a codebook count the model does not have (``ModelError``)."""
        if not 1 <= num_codebooks <= self.max_codebooks:
            raise ModelError(f"{self.name} has {self.max_codebooks} codebooks, asked for {num_codebooks}")

    def _normalise(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``wav`` scaled to unit RMS of its mono mix, the scale ``[B, 1, 1]``) for
        normalising models, else (``wav``, None). The epsilon keeps silence finite."""
        if not self.config.normalize:
            return wav, None
        mono = wav.mean(dim=1, keepdim=True)
        scale = 1e-8 + mono.pow(2).mean(dim=2, keepdim=True).sqrt()
        return wav / scale, scale

    def _prepare_segment(self, wav: torch.Tensor, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check one segment and normalise it: (network input, scale ``[B]`` or None)."""
        self._check_wav(wav)
        self.check_num_codebooks(num_codebooks)
        seg_len = self.segment_length
        if seg_len is not None and wav.shape[-1] > seg_len:
            raise ModelError(f"segment of {wav.shape[-1]} samples is longer than {seg_len}")
        wav, scale = self._normalise(wav.to(self._device()))
        return wav, None if scale is None else scale.view(-1)

    def forward(self, wav: torch.Tensor, num_codebooks: int) -> ModelOutput:
        """Differentiable encode -> quantise -> decode of ``wav`` ``[B, C, T]``, for training.

        No segmenting (the trainer feeds short crops). Normalising models scale each item
        to unit RMS like :meth:`encode_segment` and multiply the output back, so the
        network sees the same levels in training as at inference. In training mode the
        quantiser updates its codebooks and passes gradients straight through to the
        encoder.
        """
        self._check_wav(wav)
        self.check_num_codebooks(num_codebooks)
        length = wav.shape[-1]
        x, scale = self._normalise(wav)
        result = self.quantizer(self.require("encoder")(x), num_codebooks)
        audio = self.require("decoder")(result.quantized)
        if scale is not None:
            audio = audio * scale
        return ModelOutput(audio=audio[..., :length], codes=result.codes,
                           commitment_loss=result.commitment_loss)

    @torch.no_grad()
    def decode_segment(self, seg: EncodedSegment) -> torch.Tensor:
        """Codes of one segment -> waveform ``[B, C, F * hop_length]``."""
        return self._decode_segment(seg, conv_batch=None)

    def _decode_segment(self, seg: EncodedSegment, conv_batch: int | None) -> torch.Tensor:
        """:meth:`decode_segment`; ``conv_batch``: at most that many items per convolution
        call (see :func:`run_layers_batched`), None for all at once."""
        codes = seg.codes.to(self._device())
        if codes.dim() != 3 or codes.shape[1] > self.max_codebooks:
            raise ModelError(f"codes must be [batch, <= {self.max_codebooks}, frames], "
                             f"got {list(codes.shape)}")
        try:
            latent = self.quantizer.decode(codes.long())
            decoder = self.require("decoder")
            if conv_batch is None:
                out = decoder(latent)
            else:
                out = run_layers_batched(decoder.model, latent, conv_batch)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        if seg.scale is not None:
            out = out * seg.scale.to(out).view(-1, 1, 1)
        return out

    @torch.no_grad()
    def decode(self, segments: list[EncodedSegment]) -> torch.Tensor:
        """Segments -> waveform ``[B, C, T']``, cross-faded where segments overlap.

        T' can exceed the encoded length by up to a frame; the caller trims.
        """
        if not segments:
            raise ModelError("no segments to decode")
        stride = self.segment_stride
        if stride is None:
            if len(segments) != 1:
                raise ModelError(f"{self.name} is not segmented, got {len(segments)} segments")
            return self.decode_segment(segments[0])
        frames = [frame for run in runs(segments, self.DEFAULT_BATCH_SEGMENTS, codes_key)
                  for frame in self.decode_segments(run)]
        return linear_overlap_add(frames, stride)

    @torch.no_grad()
    def decode_segments(self, segments: list[EncodedSegment]) -> list[torch.Tensor]:
        """:meth:`decode_segment` on several equal-shaped segments in one pass (see
        :meth:`encode_segments`)."""
        if len(segments) == 1:
            return [self.decode_segment(segments[0])]
        batch = segments[0].codes.shape[0]
        scales = [s.scale for s in segments]
        # A run's segments all have a scale or none (codes_key).
        scale = None if scales[0] is None else torch.cat(cast("list[torch.Tensor]", scales), dim=0)
        joined = EncodedSegment(codes=torch.cat([s.codes for s in segments], dim=0), scale=scale)
        out = self._decode_segment(joined, self.CONV_BATCH_SEGMENTS * batch)
        return [out[i * batch:(i + 1) * batch] for i in range(len(segments))]
