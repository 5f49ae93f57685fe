"""Compress and decompress audio: the glue between model, audio conversion and container.

The model works at its own rate and channel count on torch tensors; the container holds
numpy codes; this module converts between the user's audio and both, and records in
the header what is needed to give the user back what went in.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import audio
from .container import CodeChunk, EcdcHeader, EcdcReader, EcdcWriter, StereoMode
from .errors import EcdcError, FormatError, ModelError
from .models.encodec import EncodecModel, EncodedSegment
from .weights import DEFAULT_MODEL, available_models, load_weights

STEREO_CHOICES = ("downmix", "dual")
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


class Codec:
    """A loaded model plus the conversions that turn any audio into its codes and back."""

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

    def encode(self, wav: np.ndarray, sample_rate: int, bandwidth: float = 6.0,
               stereo: Optional[str] = None) -> EncodedAudio:
        """Encode ``[C, T]`` (or ``[T]``) float audio at any rate and channel count.

        ``stereo`` applies to mono models given multi-channel input: ``downmix`` (default)
        codes the mean, ``dual`` codes the first two channels (after mixing more down to
        two) separately at twice the bitrate.
        """
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim == 1:
            wav = wav[None]
        if wav.ndim != 2:
            raise ValueError(f"audio must be [channels, samples], got shape {wav.shape}")
        if not np.isfinite(wav).all():
            raise EcdcError("audio contains NaN or infinite samples")
        num_codebooks = self.model.num_codebooks(bandwidth)
        original_channels = wav.shape[0]
        mode, coded = self._layout(wav, stereo)
        coded = audio.resample(coded, int(sample_rate), self.sample_rate)
        num_samples = coded.shape[-1]
        # DUAL codes each channel as its own batch item through the mono model.
        batch = coded[:, None, :] if mode == StereoMode.DUAL else coded[None]
        header = EcdcHeader(
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
            num_samples=num_samples,
            original_sample_rate=int(sample_rate),
            original_channels=original_channels,
        )
        chunks: List[CodeChunk] = []
        if num_samples:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
                segments = self.model.encode(x, bandwidth)
            chunks = list(self._chunks(segments))
        return EncodedAudio(header, chunks, num_samples, original_samples=wav.shape[-1])

    def decode(self, encoded: EncodedAudio, sample_rate: Optional[int] = None,
               channels: Optional[int] = None) -> Tuple[np.ndarray, int]:
        """Decode to ``[C, T]`` float32 at the original rate and channel count (or those given)."""
        header = encoded.header
        self.check_compatible(header)
        out_rate = int(sample_rate or header.original_sample_rate or header.sample_rate)
        out_channels = int(channels or header.original_channels or header.channels)
        wav = self._decode_model_rate(encoded)
        wav = audio.resample(wav, header.sample_rate, out_rate)
        if encoded.original_samples is not None and header.original_sample_rate:
            # Give back exactly as many samples as went in (resampling can be off by one).
            wav = audio.fit_length(wav, round(encoded.original_samples * out_rate / header.original_sample_rate))
        return audio.to_channels(wav, out_channels), out_rate

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

    def _layout(self, wav: np.ndarray, stereo: Optional[str]) -> Tuple[StereoMode, np.ndarray]:
        if stereo is not None and stereo not in STEREO_CHOICES:
            raise ModelError(f"unknown stereo mode {stereo!r} (use {' or '.join(STEREO_CHOICES)})")
        if self.channels > 1:
            if stereo == "dual":
                raise ModelError(f"--stereo dual is for mono models; {self.name!r} codes "
                                 f"{self.channels} channels jointly")
            return StereoMode.JOINT, audio.to_channels(wav, self.channels)
        if wav.shape[0] == 1:
            return StereoMode.MONO, wav
        if stereo == "dual":
            if self.model.config.normalize:
                raise ModelError(f"--stereo dual is not available for {self.name!r} (per-segment scaling)")
            return StereoMode.DUAL, audio.to_channels(wav, 2)
        return StereoMode.DOWNMIX, audio.to_channels(wav, 1)

    def _chunks(self, segments: Sequence[EncodedSegment]) -> Iterator[CodeChunk]:
        """One chunk per model segment; unsegmented models are cut into ~1 s chunks."""
        per_chunk = max(1, int(np.ceil(self.model.frame_rate)))
        for seg in segments:
            codes = seg.codes.to("cpu").numpy().astype(np.uint16)
            if seg.scale is not None:
                yield CodeChunk(codes, float(seg.scale.reshape(-1)[0]))
                continue
            for start in range(0, codes.shape[-1], per_chunk):
                yield CodeChunk(np.ascontiguousarray(codes[..., start:start + per_chunk]))

    def _decode_model_rate(self, encoded: EncodedAudio) -> np.ndarray:
        header = encoded.header
        total = encoded.num_samples
        streams = 2 if header.stereo_mode == StereoMode.DUAL else 1
        if not encoded.chunks:
            if total:
                raise FormatError(f"file claims {total} samples but holds no audio frames")
            return np.zeros((header.channels * streams, 0), dtype=np.float32)
        if header.has_scale:
            segments = [self._segment(c.codes, c.scale) for c in encoded.chunks]
        else:
            codes = np.concatenate([c.codes for c in encoded.chunks], axis=-1)
            segments = [self._segment(codes, None)]
        with torch.inference_mode():
            out = self.model.decode(segments).to("cpu").numpy()
        if out.shape[-1] < total:
            raise FormatError(f"file claims {total} samples but its frames decode to only {out.shape[-1]}")
        out = out[..., :total]
        # [B, C, T] -> [channels, T]; DUAL stacks the two mono streams.
        return np.ascontiguousarray(out.reshape(-1, out.shape[-1]), dtype=np.float32)

    def _segment(self, codes: np.ndarray, scale: Optional[float]) -> EncodedSegment:
        tensor = torch.from_numpy(codes.astype(np.int64)).to(self.device)
        scale_t = None
        if scale is not None:
            scale_t = torch.full((codes.shape[0],), float(scale), dtype=torch.float32, device=self.device)
        return EncodedSegment(tensor, scale_t)


# -- loading ------------------------------------------------------------------------

def load_model(name_or_path: Optional[str] = None, device: str = "cpu",
               checkpoint: Optional[str] = None, progress=None) -> Codec:
    """Load a codec by registry name, by checkpoint path, or (neither) the default model.

    ``load_model("encodec_24khz")`` downloads Meta's weights on first use;
    ``load_model("run/checkpoint.th")`` loads a local file; ``name`` plus ``checkpoint``
    loads the named architecture with weights from the file.
    """
    name = name_or_path
    if checkpoint is None and name is not None and name not in available_models():
        if os.path.exists(name) or os.sep in name or name.endswith((".th", ".pt", ".pth")):
            name, checkpoint = None, name
    if name is None and checkpoint is None:
        name = DEFAULT_MODEL
    dev = resolve_device(device)
    model, fingerprint = load_weights(name, checkpoint, progress=progress)
    return Codec(model, fingerprint, dev)


def load_model_for(header: EcdcHeader, model: Optional[str] = None, checkpoint: Optional[str] = None,
                   device: str = "cpu", progress=None) -> Codec:
    """The codec that decodes a file: the one the caller names, else the one its header names."""
    if model is None and checkpoint is None:
        if header.model_name not in available_models():
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

@contextlib.contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path`` and rename it into place only on success.

    A failure (disk full, Ctrl-C, a corrupt input discovered half way) leaves no partial
    output behind and never touches an existing file at ``path``.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def compress_file(src: Union[str, Path], dst: Union[str, Path], model: Union[None, str, Codec] = None,
                  bandwidth: float = 6.0, stereo: Optional[str] = None) -> EncodedAudio:
    """Compress an audio file to a .ecdc file (written atomically)."""
    codec = model if isinstance(model, Codec) else load_model(model)
    wav, rate = audio.read_audio(str(src))
    encoded = codec.encode(wav, rate, bandwidth, stereo)
    with atomic_output(dst) as out:
        encoded.write(out)
    return encoded


def decompress_file(src: Union[str, Path], dst: Union[str, Path], model: Union[None, str, Codec] = None,
                    sample_rate: Optional[int] = None, channels: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Decompress a .ecdc file to a 16-bit wav (written atomically)."""
    with open(src, "rb") as f:
        encoded = EncodedAudio.read(f)
    codec = model if isinstance(model, Codec) else load_model_for(encoded.header, model)
    wav, rate = codec.decode(encoded, sample_rate, channels)
    with atomic_output(dst) as out:
        audio.write_audio(out, wav, rate)
    return wav, rate
