"""Write the seed corpora: a few valid tiny .ecdc files, v1 and v0 (fuzz/corpus/), WAV
streams (fuzz/corpus_wavstream/) and checkpoint configs (fuzz/corpus_checkpoint_config/).

Run from the repository root: ``python fuzz/make_corpus.py``.  Deterministic.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import types
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
_pkg = types.ModuleType("ecdc")
_pkg.__path__ = [str(_ROOT / "ecdc")]  # type: ignore[attr-defined]
sys.modules.setdefault("ecdc", _pkg)

from ecdc.bitpack import pack_codes  # noqa: E402
from ecdc.container import (  # noqa: E402
    CodeChunk,
    EcdcHeader,
    StereoMode,
    encode_chunk,
    write_ecdc,
)
from ecdc.container.tags import tags_chunk  # noqa: E402


def header(**kw: object) -> EcdcHeader:
    fields: dict = dict(model_name="encodec_24khz", weights_fingerprint=bytes(range(16)), sample_rate=24000,
                        channels=1, stereo_mode=StereoMode.MONO, bandwidth=1.5, num_codebooks=2,
                        bits_per_code=10, hop_length=320, segment_length=0, segment_stride=0,
                        has_scale=False, num_samples=None, original_sample_rate=24000,
                        original_channels=1)
    fields.update(kw)
    return EcdcHeader(**fields)


def chunks(h: EcdcHeader, frames: list[int], seed: int) -> list[CodeChunk]:
    rng = np.random.default_rng(seed)
    return [CodeChunk(rng.integers(0, 1 << h.bits_per_code, size=(h.streams, h.num_codebooks, n)),
                      float(np.float32(rng.uniform(0.01, 2))) if h.has_scale else None)
            for n in frames]


def v1(h: EcdcHeader, frames: list[int], seed: int = 0, known: bool = False) -> bytes:
    total = max(sum(frames) * h.hop_length - 100, 0)
    if known:
        h = EcdcHeader(**{**h.__dict__, "num_samples": total})
    return write_ecdc(h, chunks(h, frames, seed), total, original_samples=total)


def v0(model: str, length: int, n_q: int) -> bytes:
    rng = np.random.default_rng(1)
    seg, stride, scaled = (48000, 47520, True) if model == "encodec_48khz" else (length, max(length, 1), False)
    payload = b""
    for offset in range(0, length, stride):
        frames = -(-min(length - offset, seg) // 320)
        if scaled:
            payload += struct.pack(">f", 0.5)
        payload += pack_codes(rng.integers(0, 1024, size=(frames, n_q)), 10)
    meta = json.dumps({"m": model, "al": length, "nc": n_q, "lm": False}).encode()
    return struct.pack(">4sBI", b"ECDC", 0, len(meta)) + meta + payload


def wav(fmt: bytes, data: bytes, magic: bytes = b"RIFF", endian: str = "<", extra: bytes = b"",
        riff_size: int | None = None, data_size: int | None = None) -> bytes:
    """A WAV file: RIFF/RIFX/RF64 header, ``extra`` chunks, 'fmt ' (body ``fmt``), 'data'."""
    def chunk(cid: bytes, body: bytes, size: int | None = None) -> bytes:
        pad = b"\0" if len(body) % 2 else b""
        return cid + struct.pack(endian + "I", len(body) if size is None else size) + body + pad

    body = b"WAVE" + extra + chunk(b"fmt ", fmt) + chunk(b"data", data, data_size)[:8] + data
    return magic + struct.pack(endian + "I", len(body) if riff_size is None else riff_size) + body


def pcm_fmt(channels: int, rate: int, bits: int, tag: int = 1, endian: str = "<") -> bytes:
    align = channels * bits // 8
    return struct.pack(endian + "HHIIHH", tag, channels, rate, rate * align, align, bits)


def wavstream_seeds() -> dict[str, bytes]:
    """Small WAV streams of every layout WavStreamReader reads, and one it hands to libsndfile."""
    rng = np.random.default_rng(3)
    i16 = rng.integers(-2**15, 2**15, size=40, dtype=np.int16)
    f32 = rng.uniform(-1, 1, size=24).astype(np.float32)
    guid_float = struct.pack("<H", 3) + bytes.fromhex("000000001000800000aa00389b71")
    extensible = (struct.pack("<HHIIHH", 0xFFFE, 2, 48000, 48000 * 8, 8, 32)
                  + struct.pack("<HHI", 22, 32, 3) + guid_float)
    ds64 = b"ds64" + struct.pack("<IQQQI", 28, 0, f32.nbytes, 12, 0)
    return {
        "pcm16_mono.wav": wav(pcm_fmt(1, 24000, 16), i16.tobytes()),
        "pcm16_unknown_sizes.wav": wav(pcm_fmt(2, 44100, 16), i16.tobytes(), riff_size=0xFFFFFFFF,
                                       data_size=0xFFFFFFFF),
        "pcm8_list_chunk.wav": wav(pcm_fmt(1, 8000, 8), bytes(range(0, 255, 5)),
                                   extra=b"LIST" + struct.pack("<I", 5) + b"INFOx\0"),
        # Tags in a LIST/INFO chunk (title, then an artist with control characters).
        "pcm16_info_tags.wav": wav(pcm_fmt(1, 8000, 16), i16[:8].tobytes(),
                                   extra=b"LIST" + struct.pack("<I", 28) + b"INFOINAM" + struct.pack("<I", 3)
                                   + b"Hi\0\0IART" + struct.pack("<I", 4) + b"a\x1bb\0"),
        "pcm24_rifx.wav": wav(pcm_fmt(1, 16000, 24, endian=">"), bytes(range(30)), magic=b"RIFX", endian=">"),
        "pcm32_odd_tail.wav": wav(pcm_fmt(1, 22050, 32), bytes(range(19))),  # a partial last frame
        "float32_extensible.wav": wav(extensible, f32.tobytes()),
        "float64_rf64.wav": wav(pcm_fmt(1, 32000, 64, tag=3), np.linspace(-1, 1, 6).tobytes(), magic=b"RF64",
                                extra=ds64, riff_size=0xFFFFFFFF, data_size=0xFFFFFFFF),
        # An encoding the stream reader does not decode (IMA ADPCM): read whole by libsndfile.
        "adpcm_fallback.wav": wav(struct.pack("<HHIIHHHH", 0x11, 1, 8000, 4055, 256, 4, 2, 505),
                                  bytes(256)),
        # G.721 ADPCM (tag 0x40), which libsndfile reads but cannot seek in (a crash once).
        "g721_unseekable.wav": base64.b64decode(
            "UklGRmUAAABXQVZFTElTVAUAAABJTkZPeABmbXQgEAAAAEAAAQBAHwAAQB8AAAEACABkYXRhMwDD9fo="),
        # Not WAV at all: Sun/NeXT .au, 16-bit PCM, read whole by libsndfile.
        "au_pcm16.au": struct.pack(">4sIIIII", b".snd", 24, 16, 3, 8000, 1) + i16[:8].byteswap().tobytes(),
    }


def checkpoint_config_seeds() -> dict[str, bytes]:
    """Configs as JSON (merged over the fuzz target's valid one): valid, the issue's hostile
    ones (NaN as Python's json writes it), and one of every inconsistency with the weights."""
    cases = {
        "valid.json": {},
        "valid_full.json": {"name": "small_fuzz", "sample_rate": 24000, "channels": 1, "causal": True,
                            "norm": "weight_norm", "bandwidths": [1.5, 3.0, 6.0], "normalize": False,
                            "segment": None, "overlap": 0.01, "n_filters": 4, "ratios": [8, 5, 4, 2],
                            "dimension": 16, "n_residual_layers": 1, "lstm_layers": 1, "codebook_size": 64},
        "stereo_group_norm.json": {"channels": 2, "norm": "time_group_norm", "causal": False,
                                   "normalize": True, "segment": 1.0},
        "issue_bandwidth_1e12.json": {"bandwidths": [6, 1e12]},
        "issue_ratio_2_40.json": {"ratios": [8, 5, 4, 2**40]},
        "issue_sample_rate_7.json": {"sample_rate": 7},
        "issue_nan_segment.json": {"segment": float("nan"), "bandwidths": [1.5, float("inf")]},
        "wrong_types.json": {"channels": "1", "ratios": "8542", "causal": 1},
        "misfit_shapes.json": {"n_filters": 8, "dimension": 32, "lstm_layers": 2},
    }
    return {name: json.dumps(config).encode() for name, config in cases.items()}


def main() -> None:
    for directory, seeds in (("corpus_wavstream", wavstream_seeds()),
                             ("corpus_checkpoint_config", checkpoint_config_seeds())):
        (_ROOT / "fuzz" / directory).mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (_ROOT / "fuzz" / directory / name).write_bytes(data)
    out = _ROOT / "fuzz" / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    mono = header()
    seg = header(model_name="encodec_48khz", sample_rate=48000, channels=2, stereo_mode=StereoMode.JOINT,
                 segment_length=480, segment_stride=400, has_scale=True, original_channels=2,
                 original_sample_rate=44100)
    dual = header(stereo_mode=StereoMode.DUAL, original_channels=2, bits_per_code=4, num_codebooks=3)
    files = {
        "v1_mono_3chunks.ecdc": v1(mono, [4, 4, 2]),
        "v1_mono_known_length.ecdc": v1(mono, [3, 1], known=True),
        "v1_segmented_scaled.ecdc": v1(seg, [2, 2, 1], known=True),
        "v1_dual_4bit.ecdc": v1(dual, [2, 1]),
        "v1_empty.ecdc": v1(header(num_samples=0), []),
        "v0_24khz.ecdc": v0("encodec_24khz", 700, 2),
        "v0_48khz.ecdc": v0("encodec_48khz", 1000, 2),
    }
    # An unknown (future) chunk type between code chunks, which readers must skip.
    base = files["v1_mono_3chunks.ecdc"]
    (body_len,) = struct.unpack_from("<H", base, 6)
    cut = 8 + body_len + 4
    files["v1_unknown_chunk.ecdc"] = base[:cut] + encode_chunk(0x58, b"future") + base[cut:]
    # A tags chunk (docs/FORMAT.md, section 13), where writers put it: right after the header.
    files["v1_tags.ecdc"] = base[:cut] + tags_chunk({"title": "T\u00eate", "artist": "A", "comment": "c"}) + base[cut:]
    for name, data in files.items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main()
