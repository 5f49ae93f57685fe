"""``ecdc tokenize`` and ``ecdc detokenize``: datasets of codes for audio language models.

Tokenizing plans like a batch (the same tree walk and order, the same ``--shard`` split
of :mod:`ecdc.shards`), encodes each audio file with the one encoding pipeline
(:meth:`~ecdc.codec.Codec.encode_source`, so its codes are exactly ``ecdc compress``'s, in
bounded memory whatever its length), takes an ``.ecdc`` file's codes as they are (no
model loaded), and appends each file's codes to this shard's :class:`~ecdc.dataset.Journal`
as it finishes. With ``-j N`` the files are encoded in :mod:`ecdc.pool` workers, each
leaving its file's codes in a staging ``.npz``; this process alone appends to the shard,
so a shard has one writer. Files are not batched into one forward pass across files: the
causal model's padding and LSTM make codes of files batched together differ from one
file's at the last rounding bit, and identical codes come first; ``-j`` gives the
throughput instead (bench/tokenize.py measures it).

A rerun skips what the journal holds and completes the shard; when every shard of a run
is done, the run that finishes last writes ``index.jsonl`` (``--merge`` does it too).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from . import batch
from .codec import ProgressFn
from .container import EncodedAudio
from .convert import AUDIO_EXTENSIONS, ECDC_EXTENSION, CodecCache, CompressOptions, Conversion
from .dataset import (
    INDEX,
    Journal,
    TokenDataset,
    Tokens,
    chunks_of,
    header_of,
    merge,
    read_ecdc_tokens,
    tokens_from,
)
from .errors import EcdcError
from .messages import PathError, describe_error, emit, error_line, printable, warning_line
from .outputs import atomic_output
from .pool import run_pool
from .shards import Shard
from .streams import STDIO
from .wavstream import WavStreamWriter, open_audio_file

#: What ``-r`` picks up: audio, and .ecdc files (whose codes are taken as they are).
TOKENIZE_EXTENSIONS = AUDIO_EXTENSIONS | {ECDC_EXTENSION}
DEFAULT_BANDWIDTH = 6.0


@dataclass
class Item:
    """One input file of the run: where it is, and its path in the dataset."""

    src: str
    rel: str


@dataclass
class TokenPlan:
    """This shard's files (in the batch order), and the inputs that are errors."""

    items: list[Item] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def plan_tokenize(inputs: Sequence[str], recursive: bool, shard: Shard) -> TokenPlan:
    """Expand files and directories (``-r``) as a batch does; keep ``shard``'s files. A file's
    dataset path is its path under the directory argument (a file argument: its name)."""
    plan = TokenPlan()
    claimed: dict[str, str] = {}
    position = -1
    for arg in inputs:
        if arg == STDIO:
            raise EcdcError("tokenize reads files, not - (stdin)")
        if not os.path.exists(arg):
            plan.errors.append((arg, "no such file or directory"))
            continue
        if os.path.isdir(arg):
            if not recursive:
                plan.errors.append((arg, "is a directory (use -r to tokenize the files in it)"))
                continue
            pairs = [(p, p.relative_to(arg)) for p in batch._walk(Path(arg), TOKENIZE_EXTENSIONS, plan.warnings)]
        else:
            pairs = [(Path(arg), Path(Path(arg).name))]
        for path, rel in pairs:
            position += 1
            key = rel.as_posix()
            if key in claimed:
                if shard.takes(position):
                    plan.errors.append((str(path), f"its dataset path {key} is also {claimed[key]}'s"))
                continue
            claimed[key] = str(path)
            if shard.takes(position):
                plan.items.append(Item(str(path), key))
    return plan


class Tokenizer(Conversion):
    """One input file to its :class:`~ecdc.dataset.Tokens` (and, for a pool worker, to a
    staging ``.npz`` the parent appends to the shard)."""

    kind = "tokenize"
    extensions = frozenset(TOKENIZE_EXTENSIONS)
    reads = "audio"
    options: CompressOptions

    def __init__(self, codecs: CodecCache, bandwidth: float | None):
        super().__init__(codecs, CompressOptions(bandwidth or DEFAULT_BANDWIDTH))
        self.requested = bandwidth

    def preload(self, batch: bool) -> None:
        self.codecs.default().check_bandwidth(self.options.bandwidth)

    def tokens(self, src: str, progress: ProgressFn | None = None) -> Tokens:
        if src.lower().endswith(ECDC_EXTENSION):
            tokens = read_ecdc_tokens(src)
            coded = tokens.meta["bandwidth"]
            if self.requested is not None and abs(coded - self.requested) > 1e-9:
                raise EcdcError(f"coded at {coded:g} kbps, not -b {self.requested:g} (codes cannot be re-coded "
                                "at another bandwidth; compress the audio again)")
            if progress is not None:
                progress(tokens.meta["duration"])
            return tokens
        codec = self.codecs.default()
        with open_audio_file(src) as source:
            encoded = codec.encode_source(source, self.options.bandwidth, None, progress)
        return tokens_from(encoded.header, encoded.chunks, encoded.num_samples, encoded.original_samples)

    def convert(self, src: str | Path, dst: str | Path, progress: ProgressFn | None = None,
                warn: Any = None, overwrite: bool = False, keep: list | None = None) -> Tokens:
        """In a pool worker: the file's tokens into the staging file ``dst``."""
        tokens = self.tokens(str(src), progress)
        with atomic_output(dst) as out:
            np.savez(out, codes=tokens.codes, meta=np.array(json.dumps(tokens.meta)),
                     scales=np.asarray(tokens.scales if tokens.scales is not None else [], np.float64),
                     segments=np.asarray(tokens.segments if tokens.segments is not None else [], np.int64),
                     has_scales=np.array(tokens.scales is not None), has_segments=np.array(tokens.segments is not None))
        return tokens

    @staticmethod
    def estimate_seconds(path: str) -> float:
        from .convert import Compression, Decompression

        if path.lower().endswith(ECDC_EXTENSION):
            return Decompression.estimate_seconds(path)
        return Compression.estimate_seconds(path)


def _staged(path: str) -> Tokens:
    with np.load(path, allow_pickle=False) as data:
        return Tokens(np.array(data["codes"]), json.loads(str(data["meta"])),
                      [float(s) for s in data["scales"]] if bool(data["has_scales"]) else None,
                      [int(n) for n in data["segments"]] if bool(data["has_segments"]) else None)


class _HoursBar(batch.BarLines):
    """A tqdm bar over hours of audio with a files count (only on a terminal, never with ``-q``)."""

    def __init__(self, enabled: bool, total_seconds: float, files: int, stream: TextIO | None):
        self.files, self.done, self.seconds, self.stream = files, 0, 0.0, stream
        self.total = max(total_seconds, 1e-9)
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(self.total * 1000), file=stream, leave=False, dynamic_ncols=True,
                            bar_format="{percentage:3.0f}%|{bar}| {desc} [{elapsed}<{remaining}]")
            self._postfix()

    def advance(self, seconds: float) -> None:
        self.seconds += seconds
        if self.bar is not None:
            target = min(round(self.seconds * 1000), self.bar.total)
            if target > self.bar.n:
                self.bar.update(target - self.bar.n)
            self._postfix()

    def file_done(self) -> None:
        self.done += 1
        self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{self.seconds / 3600:.2f}/{self.total / 3600:.2f} h of audio, "
                                         f"{self.done}/{self.files} files", refresh=False)


@dataclass
class TokenSummary:
    """Counts for the line at the end of a run."""

    tokenized: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    tokens: int = 0
    wall: float = 0.0
    index: Path | None = None
    shard: Shard = field(default_factory=Shard)

    def lines(self) -> list[str]:
        rate = f" ({self.seconds / self.wall:.1f} h of audio per hour)" if self.wall > 0 and self.seconds else ""
        where = f"shard {self.shard}: " if self.shard.count > 1 else ""
        lines = [f"ecdc: {where}{self.tokenized} tokenized, {self.skipped} skipped (done before), {self.failed} "
                 f"failed; {self.seconds / 3600:.3f} h of audio, {self.tokens} tokens in {self.wall:.1f} s{rate}"]
        if self.index is not None:
            lines.append(f"ecdc: index of every shard: {self.index}")
        elif self.shard.count > 1:
            lines.append("ecdc: the other shards are not all done; the last to finish writes index.jsonl "
                         "(or run `ecdc tokenize --merge -o OUT`)")
        return [printable(line) for line in lines]


def run_tokenize(tokenizer: Tokenizer, inputs: Sequence[str], output: str, layout: str, recursive: bool,
                 shard: Shard, force: bool, workers: int = 1, quiet: bool = False,
                 stream: TextIO | None = None) -> TokenSummary:
    """Tokenize this shard's files into ``output``, resuming what a journal there holds
    (``force``: start the shard over); one line per failed file, and the summary back."""
    stream = stream or sys.stderr
    started = time.monotonic()
    root = Path(output)
    if root.exists() and not root.is_dir():
        raise PathError(output, "not a directory (tokenize writes a dataset folder)")
    plan = plan_tokenize(inputs, recursive, shard)
    journal = Journal.open(root, layout, shard.index, shard.count, fresh=force)
    done = journal.done()
    todo = [item for item in plan.items if item.rel not in done]
    summary = TokenSummary(skipped=len(plan.items) - len(todo), failed=len(plan.errors), shard=shard)
    if any(not item.src.lower().endswith(ECDC_EXTENSION) for item in todo):
        tokenizer.preload(batch=True)  # a bad --model or -b fails before any file; .ecdc alone loads none
    estimates = [tokenizer.estimate_seconds(item.src) for item in todo]
    bar = _HoursBar(batch.progress_enabled(quiet, stream), sum(estimates), len(todo), stream)
    failures: list[str] = [src for src, _ in plan.errors]
    for src, message in plan.warnings:
        bar.write(warning_line(src, message))
    for src, message in plan.errors:
        bar.write(error_line(src, message))

    def finished(item: Item, tokens: Tokens | None, error: str | None) -> None:
        if tokens is not None:
            try:
                journal.add(item.rel, tokens)
            except Exception as exc:  # noqa: BLE001 - reported; the journal stays whole
                tokens, error = None, describe_error(exc)
        if tokens is None:
            summary.failed += 1
            failures.append(item.src)
            bar.write(error_line(item.src, error or "failed"))
        else:
            summary.tokenized += 1
            summary.seconds += tokens.meta["duration"]
            summary.tokens += tokens.codes.size
        bar.file_done()

    try:
        if workers <= 1 or len(todo) <= 1:
            for item in todo:
                try:
                    tokens = tokenizer.tokens(item.src, bar.advance)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
                    finished(item, None, describe_error(exc))
                else:
                    finished(item, tokens, None)
        else:
            _run_workers(tokenizer, journal, todo, estimates, workers, bar, finished)
    finally:
        bar.close()
    journal.finish(failures)
    try:
        summary.index, _ = merge(root)
    except EcdcError:
        summary.index = None  # other shards still running or to run
    summary.wall = time.monotonic() - started
    return summary


def _run_workers(tokenizer: Tokenizer, journal: Journal, todo: list[Item], estimates: list[float], workers: int,
                 bar: _HoursBar, finished: Any) -> None:
    """Encode in pool workers; each file's staging ``.npz`` is appended here, then removed."""
    staging = journal.root / f".staging-{journal.name}"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed run left is redone
    staging.mkdir(parents=True)
    jobs = [batch.Job(item.src, str(staging / f"{i}.npz"), estimates[i], overwrite=True)
            for i, item in enumerate(todo)]
    by_dst = {job.dst: item for job, item in zip(jobs, todo)}

    def done(job: batch.Job, seconds: float | None, error: str | None) -> None:
        item = by_dst[job.dst]
        if error is not None:
            finished(item, None, error)
            return
        try:
            tokens = _staged(job.dst)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            finished(item, None, describe_error(exc))
        else:
            finished(item, tokens, None)
        Path(job.dst).unlink(missing_ok=True)

    try:
        run_pool(tokenizer, jobs, min(workers, len(jobs)), bar, done)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- detokenize


def entry_audio(dataset: TokenDataset, entry: dict[str, Any]) -> EncodedAudio:
    """A dataset entry as the encoded file it came from (for decoding exactly as decompress does)."""
    header = header_of(entry)
    chunks = chunks_of(header, np.asarray(dataset.codes(entry)), entry.get("scales"), entry.get("segments"))
    return EncodedAudio(header, chunks, int(entry["num_samples"]), int(entry["original_samples"]))


def write_wav(path: Path, blocks: Any, rate: int, channels: int, overwrite: bool) -> int:
    """Decoded blocks as a 16-bit WAV, written atomically; returns the frames written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite) as out:
        sink = WavStreamWriter(out, rate, channels)
        for block in blocks:
            sink.write(block)
        sink.close()
        return sink.frames_written


def run_detokenize(codecs: CodecCache, source: str, paths: Sequence[str], output: str | None, force: bool,
                   quiet: bool, stream: TextIO | None = None) -> int:
    """Decode a dataset's entries (all, or those named) to WAVs under ``output``, or one
    ``.npy`` of codes (a language model's) to one WAV; returns the number of failures."""
    stream = stream or sys.stderr
    started = time.monotonic()
    if source.lower().endswith(".npy") and os.path.isfile(source):
        try:
            codes = np.load(source, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise PathError(source, f"not a .npy array of codes ({describe_error(exc)})") from None
        dst = Path(output) if output else Path(source).with_suffix(".wav")
        if dst.is_dir():
            dst = dst / Path(source).with_suffix(".wav").name
        codec = codecs.default()
        wav = codec.decode_codes(codes)
        write_wav(dst, [wav], codec.sample_rate, codec.channels, force)
        if not quiet:
            emit(f"ecdc: {dst}: {wav.shape[-1] / codec.sample_rate:.2f} s at {codec.sample_rate} Hz", stream)
        return 0
    if output is None:
        raise PathError("", "detokenize of a dataset needs -o DIR")
    dataset = TokenDataset(source)
    wanted = set(paths)
    entries = [e for e in dataset.entries if not wanted or e["path"] in wanted]
    failed = sorted(wanted - {e["path"] for e in entries})
    for missing in failed:
        emit(error_line(missing, "not in the dataset"), stream)
    written = skipped = 0
    seconds = 0.0
    for entry in entries:
        dst = Path(output) / Path(entry["path"]).with_suffix(".wav")
        if dst.exists() and not force:
            skipped += 1
            continue
        try:
            encoded = entry_audio(dataset, entry)
            codec = codecs.for_header(encoded.header)
            blocks = codec.decode_blocks(encoded)
            rate, channels = codec.output_format(encoded.header)
            frames = write_wav(dst, blocks, rate, channels, force)
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the rest
            emit(error_line(entry["path"], describe_error(exc)), stream)
            failed.append(entry["path"])
            continue
        written += 1
        seconds += frames / rate
    if not quiet:
        emit(printable(f"ecdc: {written} detokenized, {skipped} skipped (output exists; -f overwrites), "
                       f"{len(failed)} failed; {seconds:.1f} s of audio in {time.monotonic() - started:.1f} s"),
             stream)
    return len(failed)


__all__ = ["INDEX", "Tokenizer", "plan_tokenize", "run_detokenize", "run_tokenize"]
