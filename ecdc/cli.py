"""The ``ecdc`` command line: click glue around :mod:`ecdc.convert` and :mod:`ecdc.batch`;
what messages say is :mod:`ecdc.messages`'s."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from . import __version__, batch
from .codec import STEREO_CHOICES, DownloadFn
from .convert import (
    CodecCache,
    Compression,
    CompressOptions,
    Conversion,
    Decompression,
    DecompressOptions,
    ModelChoice,
    check_input,
    read_encoded,
    require_stream,
)
from .errors import EcdcError
from .messages import command_error_line, emit, messages_lost, printable, run_reporting
from .models.encodec import format_kbps
from .pool import interrupts_as_keyboard


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
                            help="Registered model name (see `ecdc models`). Default: compress uses "
                                 "ecdc's bundled default model, decompress the model the file names.")
checkpoint_option = click.option("--checkpoint", metavar="PATH", type=click.Path(dir_okay=False),
                                 help="Load weights from a local checkpoint file.")
device_option = click.option("--device", default="auto", show_default=True,
                             type=click.Choice(["auto", "cpu", "cuda"]),
                             help="Where to run the model; auto uses CUDA when available.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ecdc")
def main() -> None:
    """ecdc: neural audio compression with EnCodec.

    \b
      ecdc compress speech.wav -b 6        # writes speech.ecdc (6 kbps)
      ecdc decompress speech.ecdc          # writes speech.wav
      ecdc info speech.ecdc
    """
    _hold_closed_descriptors()


recursive_option = click.option("-r", "--recursive", is_flag=True,
                                 help="Convert the files in directory INPUTs, recursing into subdirectories.")
jobs_option = click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 256), metavar="N",
                           help="Convert N files at a time (processes sharing the CPU cores).")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
force_option = click.option("-f", "-y", "--force", is_flag=True,
                            help="Overwrite existing outputs (with several inputs they are skipped otherwise; "
                                 "-y as in ffmpeg).")
no_overwrite_option = click.option("-n", "--no-overwrite", is_flag=True,
                                   help="Never overwrite (the default; ffmpeg's -n): an existing output is an "
                                        "error for a single input and skipped in a batch.")


def _conversion_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that ``compress`` and ``decompress`` end with, in their --help order,
    around the command run under :func:`_report_errors`."""
    func = _report_errors(func)
    func = _no_contradiction(func)
    for option in (quiet_option, jobs_option, recursive_option, no_overwrite_option, force_option, device_option):
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
@click.option("--stereo", type=click.Choice(STEREO_CHOICES), default=None,
              help="Multi-channel input with a mono model: downmix (default) or dual (each channel coded, 2x bits).")
@_conversion_options
def compress(inputs: tuple[str, ...], output: str | None, bandwidth: float, model: str | None,
             checkpoint: str | None, stereo: str | None, device: str, force: bool, recursive: bool,
             jobs: int, quiet: bool) -> None:
    """Compress audio files (wav, flac, ogg, ...; - for stdin) or directories (-r) to .ecdc."""
    codecs = CodecCache(ModelChoice(model, checkpoint, device), _download_progress(), only="encode")
    _convert(Compression(codecs, CompressOptions(bandwidth, stereo)), inputs, output, recursive, force, jobs, quiet)


@main.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUTPUT",
              help="Output file (- for stdout), or the directory for several inputs "
                   "(default: beside each input, suffix .wav, or .raw with --raw; stdout for stdin).")
@click.option("--rate", "sample_rate", type=click.IntRange(1000, 768000), metavar="HZ",
              help="Output sample rate (default: the original input's).")
@click.option("--channels", type=click.IntRange(1, 64), metavar="N",
              help="Output channel count (default: the original input's).")
@click.option("--raw", is_flag=True, help="Write headerless 16-bit little-endian PCM (s16le) instead of wav.")
@click.option("--salvage", is_flag=True,
              help="Decode the intact chunks of a damaged file, with silence for what was lost "
                   "(reported as warnings) instead of refusing it.")
@click.option("--max-silence", type=click.FloatRange(min=0), metavar="SECONDS",
              help="With --salvage: the most silence to put in place of lost audio, in all "
                   "(default: in proportion to the file's size, so that a small file cannot "
                   "ask for hours of it; inf: as much as the damaged file proves).")
@model_option
@checkpoint_option
@_conversion_options
def decompress(inputs: tuple[str, ...], output: str | None, sample_rate: int | None, channels: int | None,
               raw: bool, salvage: bool, max_silence: float | None, model: str | None,
               checkpoint: str | None, device: str, force: bool, recursive: bool, jobs: int,
               quiet: bool) -> None:
    """Decompress .ecdc files (ecdc's or Meta's; - for stdin) or directories (-r) to 16-bit wav."""
    codecs = CodecCache(ModelChoice(model, checkpoint, device), _download_progress(), only="decode")
    options = DecompressOptions(sample_rate, channels, raw, salvage, max_silence)
    _convert(Decompression(codecs, options), inputs, output, recursive, force, jobs, quiet)


def _convert(conversion: Conversion, inputs: Sequence[str], output: str | None, recursive: bool, force: bool,
             jobs: int, quiet: bool) -> None:
    """The body of ``compress`` and ``decompress``: one input (a file or -), or a batch."""
    if not batch.is_batch(inputs, recursive):
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
    plan = batch.plan_batch(conversion.kind, inputs, output, recursive, force, conversion.options)
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


def _info_lines(src: str) -> list[str]:
    """What ``info`` shows of one file, read and checked whole before anything is shown."""
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
                      f" x {h.frame_rate:g} Hz" + (" x 2 channels)" if h.streams == 2 else ")")),
        ("duration", f"{duration:.3f} s ({encoded.num_samples} samples)"),
        ("sample rate", f"{h.sample_rate} Hz (original {h.original_sample_rate} Hz)"),
        ("channels", f"{h.channels} coded, {h.stereo_mode.name.lower()} (original {h.original_channels})"),
        ("chunks", str(len(encoded.chunks))),
        ("size", f"{size} bytes"),
        ("bitrate", f"{size * 8 / duration / 1000:.2f} kbps overall" if duration > 0 else "n/a"),
    ]
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
@_report_errors
def models() -> None:
    """List the models ecdc knows by name: the default first, then its releases, then the rest."""
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


if __name__ == "__main__":
    main()
