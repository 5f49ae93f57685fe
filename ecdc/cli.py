"""The ``ecdc`` command line: click glue around :mod:`ecdc.convert` and :mod:`ecdc.batch`;
what messages say is :mod:`ecdc.messages`'s."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click

# Only what --version and --help need is imported here (no torch, no numpy): each command
# imports the layers it uses when it runs, and only the ones that load a model import torch.
from . import __version__
from .choices import BITS_CHOICES, OUTPUT_FORMAT_CHOICES, RAW_FORMAT_CHOICES, STEREO_CHOICES, format_kbps
from .errors import EcdcError
from .messages import command_error_line, emit, messages_lost, printable, run_reporting

if TYPE_CHECKING:
    from .codec import DownloadFn
    from .container import EcdcHeader
    from .convert import Conversion
    from .wavstream import RawInput


class Bandwidth(click.ParamType):
    """``-b``: kbps as ffmpeg and opusenc users write it: ``6``, ``6.0``, ``6k``, ``6kbps``,
    ``6 kbps``, ``6kb/s`` (any case). Whether the model has that bandwidth is checked once
    it is loaded."""

    name = "kbps"
    _PATTERN = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(k|kbps|kb/s|kbit/s)?\s*", re.IGNORECASE)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        match = self._PATTERN.fullmatch(str(value))
        kbps = float(match.group(1)) if match else math.nan
        if not kbps > 0:
            self.fail(f"{value!r} is not a bitrate: give kbps as 6, 6k or 6kbps "
                      f"(24 kHz models: 1.5, 3, 6, 12, 24; 48 kHz: 3, 6, 12, 24)", param, ctx)
        return kbps


def _report_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command under :func:`~ecdc.messages.run_reporting`: expected failures become one
    line on stderr and a non-zero exit, never a traceback; the command's one input is the
    file such lines name."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        inputs = kwargs.get("inputs") or (kwargs.get("input_path"),)
        where = inputs[0] if len(inputs) == 1 and inputs[0] else ""
        return run_reporting(lambda: func(*args, **kwargs), where)

    return wrapper


def _hold_closed_descriptors() -> None:
    """Put /dev/null on standard descriptors closed at startup (``<&-``, ``>&-``, ``2>&-``).

    Python leaves that ``sys`` stream None, which the commands check before using it
    (:func:`~ecdc.convert.require_stream`). The placeholder stops the next file ecdc opens
    from becoming descriptor 0, 1 or 2, where a library writing to "stderr" would hit it.
    """
    for fd, stream, flags in ((0, sys.stdin, os.O_RDONLY), (1, sys.stdout, os.O_WRONLY),
                              (2, sys.stderr, os.O_WRONLY)):
        if stream is not None:
            continue
        try:
            os.fstat(fd)
            continue  # open after all
        except OSError:
            pass
        try:
            held = os.open(os.devnull, flags)
            if held != fd:
                os.dup2(held, fd)
                os.close(held)
        except OSError:
            pass


def _download_progress() -> DownloadFn | None:
    """A tqdm bar for first-use weight downloads, shown only on a terminal."""
    from . import batch

    if not batch.progress_enabled(False, sys.stderr):  # also when stderr is closed
        return None
    bar = None

    def update(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="downloading weights", leave=False)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return update


model_option = click.option("--model", "-m", "model", metavar="NAME",
                            help="Registered model name (see `ecdc models`), or hf:OWNER/NAME from the local "
                                 "Hugging Face cache. Default: compress uses ecdc's bundled default model, "
                                 "decompress the model the file names.")
checkpoint_option = click.option("--checkpoint", metavar="PATH", type=click.Path(),
                                 help="Load weights from a local checkpoint file (.th/.pt), or a transformers "
                                      "EncodecModel directory (config.json + model.safetensors).")
device_option = click.option("--device", default="auto", show_default=True,
                             type=click.Choice(["auto", "cpu", "cuda"]),
                             help="Where to run the model; auto uses CUDA when available.")
latency_option = click.option("--latency", type=click.FloatRange(0, 60), metavar="SECONDS",
                              help="Process and write in blocks of this much audio, so that a reader on a pipe "
                                   "gets output this soon (0: the smallest blocks; codes are the same at any "
                                   "value). Default: 0.5 from a pipe to a pipe, else long blocks (fastest).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="ecdc")
def main() -> None:
    """ecdc: neural audio compression with EnCodec.

    \b
      ecdc compress speech.wav -b 6                 # writes speech.ecdc (6 kbps)
      ecdc decompress speech.ecdc -o decoded.wav    # writes decoded.wav
      ecdc info speech.ecdc

    The default model ships with ecdc: these run offline.
    """
    _hold_closed_descriptors()


recursive_option = click.option("-r", "--recursive", is_flag=True,
                                 help="Convert the files in directory INPUTs, recursing into subdirectories.")
jobs_option = click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 256), metavar="N",
                           help="Convert N files at a time (processes sharing the CPU cores).")
quiet_option = click.option("-q", "--quiet", is_flag=True,
                             help="No progress bar, no end-of-run figures and no batch summary (errors still show).")
force_option = click.option("-f", "-y", "--force", is_flag=True,
                            help="Overwrite existing outputs (with several inputs they are skipped otherwise; "
                                 "-y as in ffmpeg).")
no_overwrite_option = click.option("-n", "--no-overwrite", is_flag=True,
                                   help="Never overwrite (the default; ffmpeg's -n): an existing output is an "
                                        "error for a single input and skipped in a batch.")
shard_option = click.option("--shard", "shard", metavar="K/N",
                            help="Convert only shard K of N (0 to N-1) of the batch's files, split the same way "
                                 "on every machine; auto: from torchrun's RANK/WORLD_SIZE or a SLURM array's "
                                 "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT.")


def _shard_of(text: str | None, from_env_by_default: bool) -> Any:
    """The :class:`~ecdc.shards.Shard` that ``--shard`` (or the scheduler) gives, or None."""
    from .shards import parse_shard, shard_from_env

    if text is None and not from_env_by_default:
        return None
    if text is None:
        return shard_from_env()
    if text.strip().lower() == "auto":
        shard = shard_from_env()
        if shard is None:
            raise EcdcError("--shard auto: neither RANK/WORLD_SIZE (torchrun) nor SLURM_ARRAY_TASK_ID/"
                            "SLURM_ARRAY_TASK_COUNT (a SLURM array) is set", where="")
        return shard
    return parse_shard(text)


def _sharded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Take ``--shard`` off the command's arguments and leave it for :func:`_convert`."""

    @functools.wraps(func)
    def wrapper(*args: Any, shard: str | None, **kwargs: Any) -> Any:
        click.get_current_context().meta["ecdc.shard"] = shard
        return func(*args, **kwargs)

    return wrapper


def _conversion_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that ``compress`` and ``decompress`` end with, in their --help order,
    around the command run under :func:`_report_errors`."""
    func = _report_errors(func)
    func = _no_contradiction(func)
    func = _sharded(func)
    for option in (quiet_option, shard_option, jobs_option, recursive_option, no_overwrite_option, force_option,
                   device_option):
        func = option(func)
    return func


def _no_contradiction(func: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse ``-n`` with ``-f``/``-y`` as a usage error; the command never sees ``-n``,
    which asks for what it does anyway."""

    @functools.wraps(func)
    def wrapper(*args: Any, no_overwrite: bool, **kwargs: Any) -> Any:
        if no_overwrite and kwargs.get("force"):
            raise click.UsageError("-n (never overwrite) contradicts -f/-y (overwrite)")
        return func(*args, **kwargs)

    return wrapper


#: The tags compress sets from options of their names (opusenc's), besides --comment.
_TAG_OPTIONS = ("title", "artist", "album", "date", "genre", "tracknumber")


def _comment_tag(text: str, tag_keys: Sequence[str]) -> tuple[str, str]:
    """``--comment``: ``KEY=VALUE`` for a tag ecdc knows sets that tag, as opusenc's
    ``--comment`` does; any other text is the comment itself."""
    key, sep, value = text.partition("=")
    if sep and key.lower() in tag_keys:
        return key.lower(), value
    return "comment", text


def _tag_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """compress's tag options, handed to the command as ``tags`` (what was set, in order,
    each checked like any tag) and ``keep_tags`` (False with ``--no-tags``)."""
    @functools.wraps(func)
    def wrapper(*args: Any, no_tags: bool, comment: tuple[str, ...], **kwargs: Any) -> Any:
        from .container.tags import TAG_KEYS, tag_problem  # numpy: not for --help

        given = [(key, kwargs.pop(key)) for key in _TAG_OPTIONS]
        tags = [(key, value) for key, value in given if value is not None]
        tags += [_comment_tag(text, TAG_KEYS) for text in comment]
        for key, value in tags:
            problem = tag_problem(key, value) if value else None
            if problem is not None:
                raise click.BadParameter(problem, param_hint=f"'--{key}'")
        return func(*args, tags=tuple(tags), keep_tags=not no_tags, **kwargs)

    options = [click.option(f"--{key}", metavar="TEXT", help=f"Set the {key} tag ('' removes the input's).")
               for key in _TAG_OPTIONS]
    options.append(click.option("--comment", metavar="TEXT", multiple=True,
                                help="Set the comment tag; KEY=VALUE sets tag KEY (as opusenc does).",))
    options.append(click.option("--no-tags", "--discard-comments", "no_tags", is_flag=True,
                                help="Do not carry the input's tags (title, artist, ...) into the .ecdc file."))
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@main.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUTPUT",
              help="Output file (- for stdout), or the directory for several inputs "
                   "(default: beside each input, suffix .ecdc; stdout for stdin).")
@click.option("-b", "--bandwidth", default=6.0, show_default=True, type=Bandwidth(), metavar="KBPS",
              help="Target bitrate in kbps (6, 6k or 6kbps). 24 kHz models: 1.5, 3, 6, 12, 24 "
                   "(2, 4, 8, 16, 32 codebooks).")
@model_option
@checkpoint_option
@latency_option
@click.option("--stereo", type=click.Choice(STEREO_CHOICES), default=None,
              help="Multi-channel input with a mono model: downmix (default; ITU-R BS.775, LFE dropped) "
                   "or separate (each channel coded on its own, N x bits; dual is its older name).")
@click.option("--raw", "raw_input", is_flag=True,
              help="The input is headerless PCM (as opusenc's --raw): 48 kHz stereo s16le unless --raw-rate, "
                   "--raw-channels or --raw-format (each of which implies --raw) say otherwise.")
@click.option("--raw-rate", type=click.IntRange(1000, 1_000_000), metavar="HZ",
              help="Sample rate of raw input [default: 48000, as opusenc].")
@click.option("--raw-channels", "--raw-chan", "raw_channels", type=click.IntRange(1, 255), metavar="N",
              help="Channel count of raw input, interleaved [default: 2, as opusenc].")
@click.option("--raw-format", type=click.Choice(RAW_FORMAT_CHOICES),
              help="Sample format of raw input: 16 or 24-bit integers or 32-bit float, little-endian "
                   "[default: s16le].")
@_tag_options
@_conversion_options
def compress(inputs: tuple[str, ...], output: str | None, bandwidth: float, model: str | None,
             checkpoint: str | None, stereo: str | None, device: str, force: bool, recursive: bool,
             jobs: int, quiet: bool, tags: tuple[tuple[str, str], ...] = (), keep_tags: bool = True,
             raw_input: bool = False, raw_rate: int | None = None, raw_channels: int | None = None,
             raw_format: str | None = None, latency: float | None = None) -> None:
    """Compress audio files (wav, flac, ogg, ...; - for stdin; headerless PCM with --raw) or
    directories (-r) to .ecdc."""
    from .convert import CodecCache, Compression, CompressOptions, ModelChoice

    codecs = CodecCache(ModelChoice(model, checkpoint, device), _download_progress(), only="encode")
    options = CompressOptions(bandwidth, stereo, tags=tags, keep_tags=keep_tags, latency=latency,
                              raw=_raw_input(raw_input, raw_rate, raw_channels, raw_format))
    _convert(Compression(codecs, options), inputs, output, recursive, force, jobs, quiet)


@main.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUTPUT",
              help="Output file (- for stdout), or the directory for several inputs "
                   "(default: beside each input, suffix .wav, or that of --format or --raw; stdout for "
                   "stdin). Its suffix names the format: .wav .flac .ogg .opus .mp3 .aiff .raw.")
@click.option("--rate", "sample_rate", type=click.IntRange(1000, 768000), metavar="HZ",
              help="Output sample rate (default: the original input's).")
@click.option("--channels", type=click.IntRange(1, 64), metavar="N",
              help="Output channel count (default: the original input's).")
@click.option("--raw", is_flag=True, help="Write headerless little-endian PCM (s16le; s24le, f32le with --bits) "
                                          "instead of wav: --format raw.")
@click.option("--format", "output_format", type=click.Choice(OUTPUT_FORMAT_CHOICES, case_sensitive=False),
              help="Output format: wav, flac, ogg (Vorbis), opus, mp3, aiff, raw [default: what -o's suffix "
                   "names; wav for stdout, for a name without a suffix and beside each input]. Opus and MP3 "
                   "outputs without --rate are written at the nearest rate they take.")
@click.option("--bits", type=click.Choice(BITS_CHOICES),
              help="Sample format of wav, aiff and raw: 16 or 24-bit integers or 32-bit float (opusdec's "
                   "--float); flac takes 16 or 24 [default: 16]. Lossy formats take none.")
@click.option("--salvage", is_flag=True,
              help="Decode the intact chunks of a damaged file, with silence for what was lost "
                   "(reported as warnings) instead of refusing it.")
@click.option("--max-silence", type=click.FloatRange(min=0), metavar="SECONDS",
              help="With --salvage: the most silence to put in place of lost audio, in all "
                   "(default: in proportion to the file's size, so that a small file cannot "
                   "ask for hours of it; inf: as much as the damaged file proves).")
@model_option
@checkpoint_option
@latency_option
@_conversion_options
def decompress(inputs: tuple[str, ...], output: str | None, sample_rate: int | None, channels: int | None,
               raw: bool, salvage: bool, max_silence: float | None, model: str | None,
               checkpoint: str | None, device: str, force: bool, recursive: bool, jobs: int,
               quiet: bool, output_format: str | None = None, bits: str | None = None,
               latency: float | None = None) -> None:
    """Decompress .ecdc files (ecdc's or Meta's; - for stdin) or directories (-r) to wav, or
    the format --format or -o's suffix names (flac, ogg, opus, mp3, aiff, raw)."""
    from .convert import CodecCache, Decompression, DecompressOptions, ModelChoice

    if output_format is not None:
        output_format = output_format.lower()
    if raw and output_format not in (None, "raw"):
        raise click.UsageError(f"--raw (headerless PCM) contradicts --format {output_format}")
    codecs = CodecCache(ModelChoice(model, checkpoint, device), _download_progress(), only="decode")
    options = DecompressOptions(sample_rate, channels, raw, salvage, max_silence, format=output_format, bits=bits,
                                latency=latency)
    _convert(Decompression(codecs, options), inputs, output, recursive, force, jobs, quiet)


def _raw_input(raw: bool, rate: int | None, channels: int | None, sample_format: str | None) -> RawInput | None:
    """``compress``'s raw-input options as one layout (None: the input has a header). Each
    ``--raw-*`` option implies ``--raw``, as in opusenc; what is not given is opusenc's default."""
    if not raw and rate is None and channels is None and sample_format is None:
        return None
    from .wavstream import RawInput

    default = RawInput()
    return RawInput(rate or default.sample_rate, channels or default.channels, sample_format or default.format)


def _convert(conversion: Conversion, inputs: Sequence[str], output: str | None, recursive: bool, force: bool,
             jobs: int, quiet: bool) -> None:
    """The body of ``compress`` and ``decompress``: one input (a file or -), or a batch."""
    from . import batch
    from .pool import interrupts_as_keyboard

    shard = _shard_of(click.get_current_context().meta.get("ecdc.shard"), from_env_by_default=False)
    if not batch.is_batch(inputs, recursive) and shard is None:
        src = inputs[0]
        dst = batch.single_output(src, output, conversion.suffix)
        conversion.check(src, dst, force)
        conversion.preload(batch=False)
        with interrupts_as_keyboard():
            batch.convert_single(conversion, src, dst, quiet, overwrite=force,
                                 make_dirs=batch.names_directory(output))
        return
    batch.check_batch_output(output, inputs)  # before the model loads and any folder is made
    conversion.preload(batch=True)
    plan = batch.plan_batch(conversion.kind, inputs, output, recursive, force, conversion.options, shard)
    with interrupts_as_keyboard():
        summary = batch.run_batch(conversion, plan, jobs, quiet)
    if not quiet:
        emit(summary.line(), sys.stderr)
    sys.exit(1 if summary.failed or messages_lost() else 0)


@main.command()
@click.argument("inputs", metavar="FILE...", nargs=-1, required=True)
@_report_errors
def info(inputs: tuple[str, ...]) -> None:
    """Show what .ecdc files hold (reads and checks each whole file)."""
    from .convert import require_stream  # the container layer: no model, no torch

    if len(inputs) == 1:
        for line in _info_lines(inputs[0]):
            click.echo(line)
        return
    require_stream(sys.stdout, "output")
    shown = failed = 0
    for src in inputs:
        # Several files: each block headed by its name, as head(1) does; a bad one is one line on stderr.
        try:
            lines = _info_lines(src)
        except BrokenPipeError:
            raise
        except (EcdcError, MemoryError, OSError) as exc:
            sys.stdout.flush()
            emit(command_error_line(exc, src), sys.stderr)
            failed += 1
            continue
        click.echo(("\n" if shown else "") + printable(f"==> {src} <=="))
        for line in lines:
            click.echo(line)
        shown += 1
    if failed:
        sys.exit(1)


def _layout_note(header: EcdcHeader) -> str:
    """``, FL+FR+FC+LFE+BL+BR``: the original channels' speakers, where there are more than
    two or the file records a layout other than plain mono or stereo."""
    if header.original_channels <= 2 and not header.channel_mask:
        return ""
    from .audio import channel_layout, describe_layout  # numpy and libsndfile, only for this

    return ", " + describe_layout(channel_layout(header.original_channels, header.channel_mask))


def _info_lines(src: str) -> list[str]:
    """What ``info`` shows of one file, read and checked whole before anything is shown."""
    from .container import TAG_KEYS
    from .convert import check_input, read_encoded, require_stream

    check_input(src)
    require_stream(sys.stdout, "output")
    encoded, size = read_encoded(src)
    h = encoded.header
    duration = encoded.num_samples / h.sample_rate
    rows = [
        ("format version", str(h.version)),
        ("model", h.model_name),
        ("weights", h.weights_fingerprint.hex() if any(h.weights_fingerprint) else "unknown"),
        ("bandwidth", f"{format_kbps(h.bandwidth)} kbps ({h.num_codebooks} codebooks x {h.bits_per_code} bits"
                      f" x {h.frame_rate:g} Hz" + (f" x {h.streams} channels)" if h.streams > 1 else ")")),
        ("duration", f"{duration:.3f} s ({encoded.num_samples} samples)"),
        ("sample rate", f"{h.sample_rate} Hz (original {h.original_sample_rate} Hz)"),
        ("channels", f"{h.channels} coded, {h.stereo_mode.name.lower()} (original {h.original_channels}"
                     f"{_layout_note(h)})"),
        ("chunks", str(len(encoded.chunks))),
        ("size", f"{size} bytes"),
        ("bitrate", f"{size * 8 / duration / 1000:.2f} kbps overall" if duration > 0 else "n/a"),
    ]
    # Tags are untrusted: values escaped, and a key ecdc does not write cannot pass for a row above.
    rows += [(key if key in TAG_KEYS else f"tag {key}", printable(value)) for key, value in encoded.tags.items()]
    width = max(len(k) for k, _ in rows)
    return [f"{key.ljust(width)}  {value}" for key, value in rows]


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE.toml",
              help="Training config (default: the run directory's config.json on --resume, else the defaults).")
@click.option("-r", "--run-dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Where checkpoints, exported weights and metrics.jsonl go.")
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. -s batch_size=16 -s data.train_folders='[\"corpus\"]'.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir exactly where it stopped.")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many more steps.")
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True), help="Stop (and save) after this long.")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_report_errors
def train(config_path: str | None, run_dir: str, overrides: tuple, resume: bool, max_steps: int | None,
          max_minutes: float | None, device: str, quiet: bool) -> None:
    """Train a codec (run under torchrun for several GPUs). See docs/TRAINING.md."""
    from .train.config import load_config
    from .train.loop import CONFIG_FILE, MODEL_FILE, Trainer

    if config_path is None and resume:
        config_path = str(Path(run_dir) / CONFIG_FILE)
    config = load_config(config_path, overrides)
    trainer = Trainer(config, Path(run_dir), device=device, resume=resume, quiet=quiet)
    last = trainer.train(max_steps=max_steps, max_minutes=max_minutes)
    if trainer.dist.is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        click.echo(f"step {trainer.step}: {summary}", err=True)
        click.echo(f"weights: {Path(run_dir) / MODEL_FILE} (use with --checkpoint)", err=True)


@main.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1)
@click.option("-o", "--output", metavar="DIR", required=True, help="The dataset folder (created; a rerun resumes it).")
@click.option("--layout", type=click.Choice(["shards", "files"]), default="shards", show_default=True,
              help="shards: a few large memory-mappable files of codes plus an index; files: one .npy per input "
                   "file, mirroring the input tree.")
@click.option("-b", "--bandwidth", default=None, type=Bandwidth(), metavar="KBPS",
              help="Bitrate of the codes, as for compress (default 6; .ecdc inputs: as they were coded).")
@model_option
@checkpoint_option
@device_option
@click.option("-r", "--recursive", is_flag=True, help="Tokenize the files in directory INPUTs, recursively.")
@jobs_option
@click.option("--shard", "shard", metavar="K/N",
              help="Tokenize only shard K of N (0 to N-1) of the input files (default: from torchrun's "
                   "RANK/WORLD_SIZE or a SLURM array's SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else all).")
@click.option("--merge", is_flag=True, help="Write the index of every shard in -o (all must be done) and exit.")
@click.option("-f", "--force", is_flag=True, help="Start this shard over instead of resuming it.")
@quiet_option
@_report_errors
def tokenize(inputs: tuple[str, ...], output: str, layout: str, bandwidth: float | None, model: str | None,
             checkpoint: str | None, device: str, recursive: bool, jobs: int, shard: str | None, merge: bool,
             force: bool, quiet: bool) -> None:
    """Turn audio (or .ecdc) files into codes for training language models (see README)."""
    from .convert import CodecCache, ModelChoice
    from .dataset import merge as merge_shards
    from .pool import interrupts_as_keyboard
    from .shards import Shard, local_device
    from .tokenize import Tokenizer, run_tokenize

    if merge:
        if inputs:
            raise click.UsageError("--merge takes no INPUTs, only -o DIR")
        index, count = merge_shards(Path(output))
        if not quiet:
            emit(printable(f"ecdc: {index}: {count} entries"), sys.stderr)
        return
    if not inputs:
        raise click.UsageError("missing INPUT... (or --merge)")
    chosen = _shard_of(shard, from_env_by_default=True) or Shard()
    codecs = CodecCache(ModelChoice(model, checkpoint, local_device(device)), _download_progress(), only="encode")
    with interrupts_as_keyboard():
        summary = run_tokenize(Tokenizer(codecs, bandwidth), inputs, output, layout, recursive, chosen, force,
                               jobs, quiet)
    if not quiet:
        for line in summary.lines():
            emit(line, sys.stderr)
    sys.exit(1 if summary.failed or messages_lost() else 0)


@main.command()
@click.argument("source", metavar="DATASET|CODES.npy")
@click.argument("paths", metavar="[PATH...]", nargs=-1)
@click.option("-o", "--output", metavar="OUTPUT",
              help="Folder for a dataset's WAVs (mirroring their paths); the WAV for a .npy (default: beside it).")
@model_option
@checkpoint_option
@device_option
@click.option("-f", "-y", "--force", is_flag=True, help="Overwrite existing outputs.")
@quiet_option
@_report_errors
def detokenize(source: str, paths: tuple[str, ...], output: str | None, model: str | None, checkpoint: str | None,
               device: str, force: bool, quiet: bool) -> None:
    """Decode a tokenized dataset (all entries or the PATHs named) or a .npy of codes back to WAV."""
    from .convert import CodecCache, ModelChoice
    from .pool import interrupts_as_keyboard
    from .tokenize import run_detokenize

    codecs = CodecCache(ModelChoice(model, checkpoint, device), _download_progress(), only="decode")
    with interrupts_as_keyboard():
        failed = run_detokenize(codecs, source, paths, output, force, quiet)
    sys.exit(1 if failed or messages_lost() else 0)


@main.command()
@_report_errors
def models() -> None:
    """List the models ecdc knows by name: the default first, then its releases, then the rest,
    then the transformers EncodecModel snapshots in the local Hugging Face cache (hf:...)."""
    from .convert import require_stream
    from .weights import aliases, available_models, default_model, release_history

    require_stream(sys.stdout, "output")

    def line(name: str, spec, extra: str = "") -> str:
        cfg = spec.config
        bws = "/".join(format_kbps(b) for b in cfg.bandwidths)
        return f"{name}{extra}: {cfg.sample_rate} Hz, {cfg.channels} ch, {bws} kbps. {spec.description}".rstrip()

    specs = available_models()
    default = default_model()
    if default is not None:
        target = aliases()[default]
        click.echo(line(default, specs[target], f" (default, = {target})"))
    releases = release_history()
    if default is not None:  # the default's family first
        releases.sort(key=lambda s: s.release is None or s.release["family"] != default)
    for spec in releases:
        info = spec.release or {}  # a release's spec always has its entry
        when = f", released {info['released']}" if info.get("released") else ""
        click.echo(line(spec.config.name, spec, f" (release {info['version']} of {info['family']}{when})"))
    for name, spec in sorted(specs.items()):
        if spec.release is None:
            click.echo(line(name, spec))
    from .hf import cached_snapshots, hub_cache_dir

    for name, snapshot, cfg in cached_snapshots():  # transformers snapshots, usable offline as --model NAME
        bws = "/".join(format_kbps(b) for b in cfg.bandwidths)
        click.echo(f"{name}: {cfg.sample_rate} Hz, {cfg.channels} ch, {bws} kbps. transformers snapshot "
                   f"in the local Hugging Face cache ({hub_cache_dir()}); files record {cfg.name}")


if __name__ == "__main__":
    main()
