"""The ``ecdc`` command line: argument checking and messages; the codec logic lives elsewhere."""

from __future__ import annotations

import functools
import io
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence, Tuple

import click

from . import __version__, batch
from .codec import STEREO_CHOICES, Codec, load_model
from .container import StereoMode
from .errors import EcdcError
from .models.encodec import format_kbps

STDIO = "-"


class CliError(Exception):
    """A one-line failure tied to a file: printed as ``ecdc: error: FILE: message``."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where


def _fail(where: str, message: str) -> NoReturn:
    raise CliError(where, message)


def _report_errors(func: Callable) -> Callable:
    """Turn expected failures into one line on stderr and a non-zero exit; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        inputs = kwargs.get("inputs") or (kwargs.get("input_path"),)
        where = inputs[0] if len(inputs) == 1 and inputs[0] else ""
        try:
            result = func(*args, **kwargs)
            if batch.messages_lost():
                sys.exit(1)  # something to report could not be shown (stderr closed)
            return result
        except CliError as exc:
            _print_error(exc.where, str(exc))
        except EcdcError as exc:
            _print_error(where, str(exc))
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): stop quietly, as tools killed by SIGPIPE do.
            _silence_stdout()
            sys.exit(141)
        except MemoryError:
            _print_error(where, "out of memory")
        except OSError as exc:
            _print_error(getattr(exc, "filename", None) or where, exc.strerror or str(exc))
        except KeyboardInterrupt:
            batch.emit("ecdc: interrupted", sys.stderr)
            sys.exit(batch.EXIT_INTERRUPTED)
        sys.exit(1)

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _print_error(where: str, message: str) -> None:
    batch.emit(batch.error_line(where, message), sys.stderr)


def _hold_closed_descriptors() -> None:
    """Put /dev/null on standard descriptors closed at startup (``<&-``, ``>&-``, ``2>&-``).

    Python leaves that ``sys`` stream None, which the commands check before using it
    (:func:`_require_stream`). The placeholder stops the next file ecdc opens from
    becoming descriptor 0, 1 or 2, where a library writing to "stderr" would hit it.
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


def _require_stream(stream: object, name: str) -> None:
    """Refuse a closed standard stream (Python has None for it) in one line, not a traceback."""
    if stream is None:
        _fail("", f"standard {name} is closed")


def _check_output(input_path: str, output: str, force: bool) -> None:
    if output == STDIO:
        _require_stream(sys.stdout, "output")
        if sys.stdout.isatty():
            _fail(output, "refusing to write binary data to a terminal; redirect it or pass -o FILE")
        return
    if input_path != STDIO and os.path.exists(output) and os.path.samefile(input_path, output):
        _fail(output, "output is the input file; choose another -o")
    if os.path.isdir(output):
        _fail(output, "output is a directory")
    if os.path.exists(output) and not force:
        _fail(output, "output exists (use -f to overwrite)")


def _check_input(input_path: str) -> None:
    if input_path == STDIO:
        _require_stream(sys.stdin, "input")
        return
    if not os.path.exists(input_path):
        _fail(input_path, "no such file")
    if os.path.isdir(input_path):
        _fail(input_path, "is a directory (use -r to convert the files in it)")
    if not os.access(input_path, os.R_OK):
        _fail(input_path, "permission denied")


def _load(model: Optional[str], checkpoint: Optional[str], device: str) -> Codec:
    return load_model(model, device=device, checkpoint=checkpoint, progress=_download_progress())


def _download_progress() -> Optional[Callable[[int, Optional[int]], None]]:
    """A tqdm bar for first-use weight downloads, shown only on a terminal."""
    if not batch.progress_enabled(False, sys.stderr):  # also when stderr is closed
        return None
    bar = None

    def update(done: int, total: Optional[int]) -> None:
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
force_option = click.option("-f", "--force", is_flag=True,
                                  help="Overwrite existing outputs (with several inputs they are skipped otherwise).")


@main.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUTPUT",
              help="Output file (- for stdout), or the directory for several inputs "
                   "(default: beside each input, suffix .ecdc; stdout for stdin).")
@click.option("-b", "--bandwidth", default=6.0, show_default=True, type=float, metavar="KBPS",
              help="Target bitrate in kbps. 24 kHz models: 1.5, 3, 6, 12, 24 (2, 4, 8, 16, 32 codebooks).")
@model_option
@checkpoint_option
@click.option("--stereo", type=click.Choice(STEREO_CHOICES), default=None,
              help="Multi-channel input with a mono model: downmix (default) or dual (each channel coded, 2x bits).")
@device_option
@force_option
@recursive_option
@jobs_option
@quiet_option
@_report_errors
def compress(inputs: Tuple[str, ...], output: Optional[str], bandwidth: float, model: Optional[str],
             checkpoint: Optional[str], stereo: Optional[str], device: str, force: bool, recursive: bool,
             jobs: int, quiet: bool) -> None:
    """Compress audio files (wav, flac, ogg, ...; - for stdin) or directories (-r) to .ecdc."""
    options = batch.CompressOptions(bandwidth, stereo)
    choice = batch.ModelChoice(model, checkpoint, device)
    single = not batch.is_batch(inputs, recursive)
    if single:
        src = inputs[0]
        dst = batch.single_output(src, output, batch.ECDC_EXTENSION)
        _check_input(src)
        _check_output(src, dst, force)
    codec = _load(model, checkpoint, device)  # once, before any worker starts (downloads too)
    codec.model.num_codebooks(bandwidth)  # reject a bad -b before reading any audio
    codec.model.release_unused("encode")  # this process never decodes
    cache = batch.CodecCache(choice, preloaded=codec, kind=batch.COMPRESS)
    if single:
        with batch.interrupts_as_keyboard():
            batch.convert_single(batch.COMPRESS, cache, src, dst, options, quiet, overwrite=force)
        return
    _run_batch(batch.COMPRESS, inputs, output, recursive, force, options, choice, jobs, quiet, cache)


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
@device_option
@force_option
@recursive_option
@jobs_option
@quiet_option
@_report_errors
def decompress(inputs: Tuple[str, ...], output: Optional[str], sample_rate: Optional[int], channels: Optional[int],
               raw: bool, salvage: bool, max_silence: Optional[float], model: Optional[str],
               checkpoint: Optional[str], device: str, force: bool, recursive: bool, jobs: int,
               quiet: bool) -> None:
    """Decompress .ecdc files (ecdc's or Meta's; - for stdin) or directories (-r) to 16-bit wav."""
    options = batch.DecompressOptions(sample_rate, channels, raw, salvage, max_silence)
    choice = batch.ModelChoice(model, checkpoint, device)
    cache = batch.CodecCache(choice, progress=_download_progress(), kind=batch.DECOMPRESS)
    if not batch.is_batch(inputs, recursive):
        src = inputs[0]
        dst = batch.single_output(src, output, options.suffix)
        _check_input(src)
        _check_output(src, dst, force)
        with batch.interrupts_as_keyboard():
            batch.convert_single(batch.DECOMPRESS, cache, src, dst, options, quiet, overwrite=force)
        return
    if choice.named:
        cache.default()  # load (and download) once, and fail early on a bad --model
    _run_batch(batch.DECOMPRESS, inputs, output, recursive, force, options, choice, jobs, quiet, cache)


def _run_batch(kind: str, inputs: Sequence[str], output: Optional[str], recursive: bool, force: bool,
               options: batch.Options, choice: batch.ModelChoice, jobs: int, quiet: bool,
               cache: batch.CodecCache) -> NoReturn:
    if output == STDIO:
        _fail(STDIO, "-o - (stdout) takes a single input file")
    plan = batch.plan_batch(kind, inputs, output, recursive, force, options)
    with batch.interrupts_as_keyboard():
        summary = batch.run_batch(kind, plan, choice, options, jobs, quiet, codecs=cache)
    if not quiet:
        batch.emit(summary.line(), sys.stderr)
    sys.exit(1 if summary.failed or batch.messages_lost() else 0)


@main.command()
@click.argument("input_path", metavar="FILE")
@_report_errors
def info(input_path: str) -> None:
    """Show what a .ecdc file holds (reads and checks the whole file)."""
    _check_input(input_path)
    _require_stream(sys.stdout, "output")
    encoded, size = batch.read_encoded(input_path)
    h = encoded.header
    duration = encoded.num_samples / h.sample_rate
    streams = 2 if h.stereo_mode == StereoMode.DUAL else 1
    rows = [
        ("format version", str(h.version)),
        ("model", h.model_name),
        ("weights", h.weights_fingerprint.hex() if any(h.weights_fingerprint) else "unknown"),
        ("bandwidth", f"{format_kbps(h.bandwidth)} kbps ({h.num_codebooks} codebooks x {h.bits_per_code} bits"
                      f" x {h.sample_rate / h.hop_length:g} Hz" + (" x 2 channels)" if streams == 2 else ")")),
        ("duration", f"{duration:.3f} s ({encoded.num_samples} samples)"),
        ("sample rate", f"{h.sample_rate} Hz (original {h.original_sample_rate} Hz)"),
        ("channels", f"{h.channels} coded, {h.stereo_mode.name.lower()} (original {h.original_channels})"),
        ("chunks", str(len(encoded.chunks))),
        ("size", f"{size} bytes"),
        ("bitrate", f"{size * 8 / duration / 1000:.2f} kbps overall" if duration > 0 else "n/a"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")


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
def train(config_path: Optional[str], run_dir: str, overrides: tuple, resume: bool, max_steps: Optional[int],
          max_minutes: Optional[float], device: str, quiet: bool) -> None:
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

    _require_stream(sys.stdout, "output")

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
        releases.sort(key=lambda s: s.release["family"] != default)
    for spec in releases:
        info = spec.release
        when = f", released {info['released']}" if info.get("released") else ""
        click.echo(line(spec.config.name, spec, f" (release {info['version']} of {info['family']}{when})"))
    for name, spec in sorted(specs.items()):
        if spec.release is None:
            click.echo(line(name, spec))


if __name__ == "__main__":
    main()
