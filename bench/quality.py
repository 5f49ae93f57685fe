"""Quality of ecdc against Opus at comparable bitrates, per content type.

    python bench/quality.py ../shared/data/corpus-lite/valid --checkpoint runs/x/model.th
    python bench/quality.py CLIPS_DIR --model encodec_24khz --bandwidths 1.5 3 6 12 24

Each sub-folder of a clips folder is a content type (speech, music, ...). Every file is cut
into clips of ``--seconds`` (at most ``--clips-per-file`` of them, evenly spaced), mixed to
mono at 24 kHz, then coded by ecdc at each bandwidth and by ``opusenc``/``opusdec``
(Debian's opus-tools) at each Opus bitrate. Metrics against the original clip:
wideband PESQ (the ``pesq`` package; speech types only), STOI (``pystoi``), multi-scale mel
distance and SI-SDR (ecdc.train.metrics). The table also shows the bitrate actually used:
the .ecdc file size (framing included) or the Opus file size (Ogg overhead included).

Needs: ``apt-get install opus-tools``, ``pip install pesq pystoi``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ecdc import audio  # noqa: E402
from ecdc.codec import load_model  # noqa: E402
from ecdc.train.data import find_audio_files  # noqa: E402
from ecdc.train.metrics import mel_distance, si_sdr  # noqa: E402

RATE = 24000


def clips_of(path: Path, seconds: float, per_file: int) -> list[np.ndarray]:
    wav, rate = audio.read_audio(str(path))
    wav = audio.resample(audio.to_channels(wav, 1), rate, RATE)[0]
    n = int(seconds * RATE)
    if wav.shape[0] <= n:
        return [wav] if wav.shape[0] > RATE // 2 else []
    starts = np.linspace(0, wav.shape[0] - n, per_file).astype(int)
    clips = [wav[s:s + n] for s in starts]
    return [c for c in clips if np.abs(c).max() > 1e-3]  # skip silent clips


def opus_round_trip(clip: np.ndarray, kbps: float, tmp: Path) -> tuple:
    src, enc, dec = tmp / "in.wav", tmp / "x.opus", tmp / "out.wav"
    soundfile.write(str(src), clip, RATE, subtype="FLOAT")
    subprocess.run(["opusenc", "--quiet", "--bitrate", f"{kbps:g}", str(src), str(enc)], check=True,
                   stderr=subprocess.DEVNULL)
    subprocess.run(["opusdec", "--quiet", "--rate", str(RATE), "--float", str(enc), str(dec)], check=True,
                   stderr=subprocess.DEVNULL)
    out, _ = soundfile.read(str(dec), dtype="float32", always_2d=True)
    out = audio.fit_length(out[:, :1].T, clip.shape[0])[0]
    return out, enc.stat().st_size * 8 / (clip.shape[0] / RATE) / 1000


def metrics(ref: np.ndarray, deg: np.ndarray, speech: bool) -> dict[str, float]:
    from pystoi import stoi

    result = {}
    if speech:
        from pesq import pesq

        r16 = audio.resample(ref[None], RATE, 16000)[0]
        d16 = audio.resample(deg[None], RATE, 16000)[0]
        try:
            result["pesq"] = float(pesq(16000, r16, d16, "wb"))
        except Exception:  # pesq refuses clips without detectable speech
            pass
    result["stoi"] = float(stoi(ref, deg, RATE, extended=False))
    x, y = torch.from_numpy(ref)[None, None], torch.from_numpy(deg.astype(np.float32))[None, None]
    result["mel"] = float(mel_distance(x, y, RATE))
    result["sisdr"] = float(si_sdr(x, y).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders whose sub-folders are content types")
    parser.add_argument("--model", default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[1.5, 3, 6, 12, 24])
    parser.add_argument("--opus", type=float, nargs="+", default=[6, 12, 24], help="Opus bitrates, kbps")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clips-per-file", type=int, default=4)
    parser.add_argument("--speech-types", nargs="+", default=["speech", "speech_nb"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    codec = load_model(args.model, device=args.device, checkpoint=args.checkpoint)
    results: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for folder in map(Path, args.folders):
            for kind_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                kind = kind_dir.name
                speech = kind in args.speech_types
                for path in find_audio_files([kind_dir]):
                    for clip in clips_of(path, args.seconds, args.clips_per_file):
                        for bw in args.bandwidths:
                            encoded = codec.encode(clip[None], RATE, bw)
                            kbps = len(encoded.to_bytes()) * 8 / (clip.shape[0] / RATE) / 1000
                            out, _ = codec.decode(encoded, RATE, 1)
                            results[(kind, f"ecdc {bw:g}")].append({**metrics(clip, out[0], speech), "kbps": kbps})
                        for kbps_target in args.opus:
                            out, kbps = opus_round_trip(clip, kbps_target, tmp)
                            results[(kind, f"opus {kbps_target:g}")].append({**metrics(clip, out, speech),
                                                                           "kbps": kbps})
                print(f"done: {kind} ({len(results[(kind, f'ecdc {args.bandwidths[0]:g}')])} clips)",
                      file=sys.stderr, flush=True)

    columns = ["kbps", "pesq", "stoi", "mel", "sisdr"]
    print(f"model: {codec.name} ({codec.fingerprint.hex()[:16]}); clips of {args.seconds:g} s at {RATE} Hz mono")
    print("| content | codec | " + " | ".join(columns) + " | clips |")
    print("|---|---|" + "---:|" * (len(columns) + 1))
    for (kind, name), rows in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1].split()[0],
                                                                       float(kv[0][1].split()[1]))):
        cells = []
        for col in columns:
            values = [r[col] for r in rows if col in r]
            cells.append(f"{np.mean(values):.3f}" if values else "–")
        print(f"| {kind} | {name} | " + " | ".join(cells) + f" | {len(rows)} |")
    print("\nHigher is better for PESQ (1–4.6), STOI (0–1) and SI-SDR (dB); lower is better for mel distance.")


if __name__ == "__main__":
    main()
