"""Tokenized datasets on disk: what ``ecdc tokenize`` writes and what training code reads.

Torch-free (numpy and the container only), so a data loader can read codes without
importing the codec. Two layouts, both described by JSON-lines index entries (one object
per input file, docs in README "Tokenizing datasets"):

* sharded: ``shard-KKKKK-of-NNNNN.codes`` holds raw little-endian int16 codes, each
  file's ``[codebooks, frames]`` block C-contiguous at its entry's ``offset`` (in codes,
  not bytes), so ``np.memmap`` of the whole shard gives every file as a zero-copy view;
  ``shard-KKKKK-of-NNNNN.jsonl`` is its journal of entries.
* per file: ``REL.npy`` (int16 ``[codebooks, frames]``, plus ``REL.scales.npy`` for models
  that scale segments) mirroring the input tree; ``files-KKKKK-of-NNNNN.jsonl`` the journal.

Raw int16 rather than one ``.npy`` per shard because a shard grows by appending while it
is written (a ``.npy`` header states its final shape up front); JSON lines rather than
Parquet because an entry is appended (and fsynced) after the codes it describes, so a
killed run leaves every entry whole but the last, which resuming drops, and because it
needs no extra dependency. ``index.jsonl`` (written by a one-shard run and by
``--merge``) lists all entries of all shards, in path order.

The journals and shard files are the one kind of output ecdc appends to instead of
writing through :func:`~ecdc.outputs.atomic_output`: a journal entry is written only
after its codes are on disk, and :meth:`Journal.open` cuts a shard back to its last
whole entry, so what a killed run leaves is never read as data. Everything else here
(``index.jsonl``, ``.npy`` files, a shard's ``.done`` marker) is written atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .container import CodeChunk, EcdcHeader, EcdcReader, StereoMode
from .errors import FormatError
from .messages import PathError
from .outputs import atomic_output

INDEX = "index.jsonl"
CODES_DTYPE = np.dtype("<i2")
LAYOUTS = ("shards", "files")
_JOURNAL = re.compile(r"^(shard|files)-(\d{5})-of-(\d{5})\.jsonl$")
#: The entry fields that describe the coded audio (all but where its codes are).
META_FIELDS = ("model", "fingerprint", "sample_rate", "channels", "stereo", "bandwidth", "codebooks",
               "bits_per_code", "hop_length", "segment_length", "segment_stride", "has_scale", "num_samples",
               "original_sample_rate", "original_channels", "original_samples", "duration", "channel_mask")


@dataclass
class Tokens:
    """One file's codes as a language model sees them: ``codes`` int16 ``[codebooks, frames]``;
    for models that scale segments (48 kHz) ``scales`` and ``segments`` (each segment's frames)."""

    codes: np.ndarray
    meta: dict[str, Any]
    scales: list[float] | None = None
    segments: list[int] | None = None

    @property
    def frames(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def duration(self) -> float:
        """Seconds of the input audio."""
        return float(self.meta["duration"])


def tokens_from(header: EcdcHeader, chunks: Iterable[CodeChunk], num_samples: int,
                original_samples: int | None) -> Tokens:
    """The codes of an encoded file (chunks joined along frames) and what decoding them needs."""
    if header.streams != 1:
        raise FormatError("codes of separately coded channels (--stereo separate) cannot be tokenized: "
                          "compress without it")
    if header.bits_per_code > 15:
        raise FormatError(f"{header.bits_per_code}-bit codes do not fit int16")
    chunk_list = list(chunks)
    codes = (np.concatenate([c.codes[0] for c in chunk_list], axis=-1) if chunk_list
             else np.zeros((header.num_codebooks, 0)))
    original = original_samples if original_samples is not None else round(
        num_samples * header.original_sample_rate / header.sample_rate)
    meta = {
        "model": header.model_name, "fingerprint": header.weights_fingerprint.hex(),
        "sample_rate": header.sample_rate, "channels": header.channels, "stereo": header.stereo_mode.name.lower(),
        "bandwidth": header.bandwidth, "codebooks": header.num_codebooks, "bits_per_code": header.bits_per_code,
        "hop_length": header.hop_length, "segment_length": header.segment_length,
        "segment_stride": header.segment_stride, "has_scale": header.has_scale, "num_samples": int(num_samples),
        "original_sample_rate": header.original_sample_rate, "original_channels": header.original_channels,
        "original_samples": int(original), "duration": round(original / header.original_sample_rate, 6),
        "channel_mask": int(getattr(header, "channel_mask", 0)),
    }
    scales = [1.0 if c.scale is None else float(c.scale) for c in chunk_list] if header.has_scale else None
    segments = [c.num_frames for c in chunk_list] if header.segmented else None
    return Tokens(np.ascontiguousarray(codes, dtype=CODES_DTYPE), meta, scales, segments)


def read_ecdc_tokens(path: str) -> Tokens:
    """The codes an ``.ecdc`` file holds, read (strictly: any damage raises) without a model."""
    with open(path, "rb") as f:
        reader = EcdcReader(f)
        chunks = list(reader)
        total = reader.total_samples if reader.total_samples is not None else 0
        return tokens_from(reader.header, chunks, total, reader.original_samples)


def header_of(entry: dict[str, Any]) -> EcdcHeader:
    """The .ecdc header an entry's codes would have had, for decoding them."""
    try:
        header = EcdcHeader(
            model_name=str(entry["model"]), weights_fingerprint=bytes.fromhex(entry["fingerprint"]),
            sample_rate=int(entry["sample_rate"]), channels=int(entry["channels"]),
            stereo_mode=StereoMode[str(entry["stereo"]).upper()], bandwidth=float(entry["bandwidth"]),
            num_codebooks=int(entry["codebooks"]), bits_per_code=int(entry["bits_per_code"]),
            hop_length=int(entry["hop_length"]), segment_length=int(entry["segment_length"]),
            segment_stride=int(entry["segment_stride"]), has_scale=bool(entry["has_scale"]),
            num_samples=int(entry["num_samples"]), original_sample_rate=int(entry["original_sample_rate"]),
            original_channels=int(entry["original_channels"]), channel_mask=int(entry.get("channel_mask", 0)))
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"index entry for {entry.get('path')!r} is incomplete or invalid ({exc})") from None
    header.validate()
    return header


def chunks_of(header: EcdcHeader, codes: np.ndarray, scales: list[float] | None = None,
              segments: list[int] | None = None) -> list[CodeChunk]:
    """``[codebooks, frames]`` codes cut back into the code chunks a decoder takes: a
    segmented model's at its segments (given, or whole segments), others in ~1 s runs."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != header.num_codebooks:
        raise FormatError(f"codes of shape {codes.shape} are not [{header.num_codebooks} codebooks, frames]")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << header.bits_per_code):
        raise FormatError(f"codes outside 0..{(1 << header.bits_per_code) - 1}")
    frames = codes.shape[-1]
    if header.segmented:
        step = header.segment_frames
        sizes = list(segments) if segments is not None else [min(step, frames - s) for s in range(0, frames, step)]
        if sum(sizes) != frames or any(not 0 < n <= step for n in sizes):
            raise FormatError(f"segment sizes {sizes[:4]}... do not add up to {frames} frames")
    else:
        step = max(1, int(np.ceil(header.frame_rate)))
        sizes = [min(step, frames - s) for s in range(0, frames, step)]
    if scales is not None and len(scales) != len(sizes):
        raise FormatError(f"{len(scales)} scales for {len(sizes)} segments")
    chunks, start = [], 0
    for i, n in enumerate(sizes):
        scale = (float(scales[i]) if scales is not None else 1.0) if header.has_scale else None
        chunks.append(CodeChunk(codes[None, :, start:start + n].astype(np.int64), scale))
        start += n
    return chunks


def fsync_append(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and make it durable before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_name(kind: str, shard: int, shards: int) -> str:
    return f"{kind}-{shard:05d}-of-{shards:05d}"


@dataclass
class Journal:
    """One shard's journal: its entries, and (sharded layout) its codes file, appended to."""

    root: Path
    layout: str
    shard: int
    shards: int
    entries: list[dict[str, Any]] = field(default_factory=list)
    _codes_end: int = 0

    @property
    def name(self) -> str:
        return shard_name("shard" if self.layout == "shards" else "files", self.shard, self.shards)

    @property
    def path(self) -> Path:
        return self.root / f"{self.name}.jsonl"

    @property
    def codes_path(self) -> Path:
        return self.root / f"{self.name}.codes"

    @property
    def done_path(self) -> Path:
        return self.root / f"{self.name}.done.json"

    @classmethod
    def open(cls, root: Path, layout: str, shard: int, shards: int, fresh: bool) -> "Journal":
        """The shard's journal, resumed: a last entry cut short is dropped, and the codes
        file is cut back to the end of the last whole entry. ``fresh``: start it over."""
        journal = cls(root, layout, shard, shards)
        root.mkdir(parents=True, exist_ok=True)
        # Not done while it runs (a rank that finishes meanwhile must not merge it).
        journal.done_path.unlink(missing_ok=True)
        if fresh:
            for path in (journal.path, journal.codes_path):
                path.unlink(missing_ok=True)
        if journal.path.exists():
            data = journal.path.read_bytes()
            whole = data[:data.rfind(b"\n") + 1]
            journal.entries = _parse_lines(whole.decode("utf-8", "replace"), str(journal.path))
            if len(whole) != len(data):
                with open(journal.path, "r+b") as f:
                    f.truncate(len(whole))
        if layout == "shards":
            journal._codes_end = max((e["offset"] + e["codebooks"] * e["frames"] for e in journal.entries), default=0)
            size = journal.codes_path.stat().st_size if journal.codes_path.exists() else 0
            if size < journal._codes_end * CODES_DTYPE.itemsize:
                raise PathError(str(journal.codes_path), "shorter than its journal says; remove the shard's "
                                                         "files (or use -f) to tokenize it again")
            if size > journal._codes_end * CODES_DTYPE.itemsize:
                with open(journal.codes_path, "r+b") as f:
                    f.truncate(journal._codes_end * CODES_DTYPE.itemsize)
        return journal

    def done(self) -> set[str]:
        """Paths already tokenized (per-file layout: whose ``.npy`` is still there)."""
        if self.layout == "shards":
            return {e["path"] for e in self.entries}
        return {e["path"] for e in self.entries if (self.root / e["file"]).exists()}

    def add(self, rel: str, tokens: Tokens) -> dict[str, Any]:
        """Write one file's codes, then its entry (the entry is only ever after its codes)."""
        entry: dict[str, Any] = {"path": rel}
        codes = np.ascontiguousarray(tokens.codes, dtype=CODES_DTYPE)
        if self.layout == "shards":
            fsync_append(self.codes_path, codes.tobytes())
            entry.update(shard=self.codes_path.name, offset=self._codes_end)
            self._codes_end += codes.size
        else:
            npy = Path(rel).with_suffix(".npy")
            entry["file"] = npy.as_posix()
            _save_npy(self.root / npy, codes)
            if tokens.scales is not None:
                _save_npy(self.root / npy.with_suffix(".scales.npy"), np.asarray(tokens.scales, np.float32))
        entry["frames"] = tokens.frames
        entry.update(tokens.meta)
        if tokens.scales is not None:
            entry["scales"] = tokens.scales
        if tokens.segments is not None:
            entry["segments"] = tokens.segments
        fsync_append(self.path, (json.dumps(entry, sort_keys=True) + "\n").encode())
        self.entries.append(entry)
        return entry

    def finish(self, failed: list[str]) -> None:
        """Mark the shard complete (``--merge`` refuses shards without it)."""
        write_json(self.done_path, {"entries": len(self.entries), "failed": failed})


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as out:
        np.save(out, array, allow_pickle=False)


def write_json(path: Path, obj: Any) -> None:
    with atomic_output(path) as out:
        out.write((json.dumps(obj, sort_keys=True) + "\n").encode())


def _parse_lines(text: str, where: str) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise PathError(where, f"line {number} is not JSON; the index is damaged") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise PathError(where, f"line {number} is not an index entry")
        entries.append(entry)
    return entries


def write_index(root: Path, entries: list[dict[str, Any]]) -> Path:
    """``index.jsonl`` over ``entries``, in path order (atomically)."""
    path = root / INDEX
    lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in sorted(entries, key=lambda e: e["path"]))
    with atomic_output(path) as out:
        out.write(lines.encode())
    return path


def merge(root: Path) -> tuple[Path, int]:
    """One ``index.jsonl`` over every shard of a sharded run, refused while any is missing
    or unfinished (it names them). Returns the index and its number of entries."""
    journals: dict[tuple[str, int], set[int]] = {}
    for name in sorted(os.listdir(root)) if root.is_dir() else []:
        match = _JOURNAL.match(name)
        if match:
            journals.setdefault((match[1], int(match[3])), set()).add(int(match[2]))
    if not journals:
        raise PathError(str(root), "holds no tokenize shards (shard-*-of-*.jsonl or files-*-of-*.jsonl)")
    if len(journals) > 1:
        runs = ", ".join(f"{kind} of {n}" for kind, n in sorted(journals))
        raise PathError(str(root), f"holds shards of different runs ({runs}); merge them from separate folders")
    (kind, shards), present = next(iter(journals.items()))
    layout = "shards" if kind == "shard" else "files"
    entries: list[dict[str, Any]] = []
    for k in range(shards):
        journal = Journal(root, layout, k, shards)
        if k not in present or not journal.done_path.exists():
            state = "has not run" if k not in present else "is unfinished"
            raise PathError(str(root), f"shard {k}/{shards} {state}: run `ecdc tokenize ... --shard {k}/{shards}` "
                                       f"to complete it, then merge")
        entries.extend(_parse_lines(journal.path.read_text("utf-8", "replace"), str(journal.path)))
    seen: set[str] = set()
    for entry in entries:
        if entry["path"] in seen:
            raise PathError(str(root), f"{entry['path']} is in more than one shard")
        seen.add(entry["path"])
    return write_index(root, entries), len(entries)


class TokenDataset:
    """A tokenized dataset (a tokenize output folder or its ``index.jsonl``), read lazily.

    ``dataset[i]`` is entry ``i``'s int16 ``[codebooks, frames]`` codes, a view into a
    memory-mapped shard (or ``.npy``): nothing is read until used; ``dataset.entries[i]``
    its metadata; iterating yields ``(path, codes)``.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / INDEX if path.is_dir() else path
        if not index.is_file():
            raise PathError(str(path), f"no {INDEX} here (a sharded run's needs `ecdc tokenize --merge`)")
        self.root = index.parent
        self.entries = _parse_lines(index.read_text("utf-8", "replace"), str(index))
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.codes(self.entries[i])

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for entry in self.entries:
            yield entry["path"], self.codes(entry)

    def codes(self, entry: dict[str, Any]) -> np.ndarray:
        """An entry's codes, checked against the file that holds them (sizes an index
        claims are never allocated: a view of what is on disk, or an error)."""
        try:
            k, frames = int(entry["codebooks"]), int(entry["frames"])
        except (KeyError, TypeError, ValueError):
            raise PathError(entry.get("path", ""), "index entry without codebooks and frames") from None
        if "shard" in entry:
            name = str(entry["shard"])
            if name not in self._maps:
                self._maps[name] = _checked_map(self.root / Path(name).name)
            flat = self._maps[name]
            offset = int(entry.get("offset", -1))
            if k < 1 or frames < 0 or offset < 0 or offset + k * frames > flat.size:
                raise PathError(entry["path"], f"index entry lies outside {name} ({flat.size} codes)")
            return flat[offset:offset + k * frames].reshape(k, frames)
        codes = np.load(self.root / str(entry["file"]), mmap_mode="r", allow_pickle=False)
        if codes.shape != (k, frames) or codes.dtype != CODES_DTYPE:
            raise PathError(str(entry["file"]), f"holds {codes.dtype} {codes.shape}, its entry says int16 "
                                                f"({k}, {frames})")
        return codes


def _checked_map(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PathError(str(path), "shard file is missing")
    if path.stat().st_size == 0:
        return np.zeros(0, CODES_DTYPE)
    return np.memmap(path, dtype=CODES_DTYPE, mode="r")


def iter_dataset(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(path, codes)`` for every file of a tokenized dataset, in index order."""
    yield from TokenDataset(path)
