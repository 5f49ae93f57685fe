"""Write the seed corpus (fuzz/corpus/): a few valid tiny .ecdc files, v1 and v0.

Run from the repository root: ``python fuzz/make_corpus.py``.  Deterministic.
"""

from __future__ import annotations

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


def main() -> None:
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
    for name, data in files.items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main()
