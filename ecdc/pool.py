"""Worker processes for batches, and the signals that stop a run.

Each worker loads the model once (the conversion it is given arrives as a recipe: see
:class:`~ecdc.convert.CodecCache`) and converts jobs until told to stop; the parent hands
out jobs, relays progress, warnings and results, and fails only the job of a worker that
died. SIGINT, SIGTERM, SIGHUP or SIGQUIT stops every worker, and each removes its partial
output on the way out.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from .convert import Conversion
from .messages import EXIT_INTERRUPTED, describe_error, warning_line
from .outputs import make_parents, remove_temp_files
from .perf import available_cpus, configure_threads

if TYPE_CHECKING:
    from .batch import Job

#: Signals that stop ecdc like Ctrl-C (SIGINT) does: cleanup runs, temp files go. SIGHUP
#: (terminal closed) and SIGQUIT (Ctrl-\) would otherwise kill it with its temp files left.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))

#: Called by the pool as each job ends: the job, its seconds of audio, or why it failed.
DoneFn = Callable[["Job", "float | None", "str | None"], None]


class Progress(Protocol):
    """What the pool reports to: the batch's progress bar."""

    def advance(self, seconds: float) -> None: ...

    def write(self, line: str) -> None: ...


class _Terminated(BaseException):
    """Raised in a worker by one of :data:`STOP_SIGNALS`: unwinds (removing temp files)
    without being caught as an error."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def cpu_count() -> int:
    """CPUs this process may use (affinity mask and cgroup quota), to share among workers."""
    return available_cpus()


def _worker(conversion: Conversion, threads: int, tasks: multiprocessing.Queue,
            results: multiprocessing.Queue) -> None:
    """A worker process: loads the model once (at its first job), converts jobs until told to stop."""
    for signum in STOP_SIGNALS:  # the parent's SIGTERM, or SIGHUP/SIGQUIT sent to the whole group
        signal.signal(signum, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        if hasattr(signal, "pthread_sigmask"):  # blocked when we were started: see _group_signals_blocked
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        configure_threads(threads)
        while True:
            item = tasks.get()
            if item is None:
                return
            index, job = item
            results.put(("start", index, os.getpid()))
            sent = [time.monotonic(), 0.0]

            def progress(seconds: float, index: int = index) -> None:
                sent[1] += seconds
                now = time.monotonic()
                if now - sent[0] > 0.1:
                    results.put(("progress", index, sent[1]))
                    sent[0], sent[1] = now, 0.0

            def warn(line: str, index: int = index) -> None:
                results.put(("warning", index, line))

            try:
                make_parents(job.dst)
                seconds = conversion.convert(job.src, job.dst, progress, warn, job.overwrite).duration
            except Exception as exc:  # noqa: BLE001 - reported, the batch goes on
                results.put(("progress", index, sent[1]))
                results.put(("done", index, None, describe_error(exc)))
            else:
                results.put(("progress", index, sent[1]))
                results.put(("done", index, seconds, None))
    except (_Terminated, KeyboardInterrupt):
        # Partial outputs were removed while unwinding; exit at once, without waiting to
        # deliver queued messages to a parent that has stopped reading.
        os._exit(EXIT_INTERRUPTED)


def _context() -> Any:
    """forkserver where there is one: torch is imported once in the server and each worker
    is a cheap fork of it; spawn elsewhere. (Never plain fork: a forked parent's torch
    thread pools can deadlock the child.)"""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ecdc.batch", "torch"])
        return ctx
    return multiprocessing.get_context("spawn")


#: What a terminal sends to its whole process group besides SIGINT: hangup, Ctrl-\.
_GROUP_SIGNALS = tuple(s for s in STOP_SIGNALS if s != signal.SIGTERM)


@contextlib.contextmanager
def _group_signals_blocked() -> Iterator[None]:
    """Block SIGHUP and SIGQUIT while multiprocessing starts its helper processes.

    The forkserver and the resource tracker inherit the mask, so, like SIGINT (which they
    ignore themselves), a hangup or Ctrl-\\ sent to the whole group does not kill them under
    a parent still cleaning up (a killed tracker is restarted and prints tracebacks, and
    keeps stderr open); they leave when the parent does. Workers unblock the signals. One
    arriving meanwhile is delivered to the parent when this ends, not lost.
    """
    if not _GROUP_SIGNALS or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run_pool(conversion: Conversion, jobs: list[Job], workers: int, bar: Progress, done: DoneFn) -> None:
    """Convert ``jobs`` in ``workers`` processes, each using an equal share of the CPU cores;
    ``done`` is called once per job. Anything raised here (KeyboardInterrupt) stops the
    workers, removes their partial outputs and propagates."""
    ctx = _context()
    threads = max(1, cpu_count() // workers)
    procs = []
    with _group_signals_blocked():  # the queues start the resource tracker, the first worker the forkserver
        tasks = ctx.Queue()
        results = ctx.Queue()
        for index, job in enumerate(jobs):
            tasks.put((index, job))
        for _ in range(workers):
            tasks.put(None)
        # Workers inherit an ignored SIGINT from the start, so Ctrl-C during their startup
        # cannot print a traceback from them; the parent stops them with SIGTERM instead.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for _ in range(workers):
                p = ctx.Process(target=_worker, args=(conversion, threads, tasks, results), daemon=True)
                p.start()
                procs.append(p)
        finally:
            signal.signal(signal.SIGINT, previous)
    running: dict[int, int] = {}  # pid -> job index
    finished: set[int] = set()

    def handle(msg: tuple) -> None:
        what, index = msg[0], msg[1]
        if what == "start":
            running[msg[2]] = index
        elif what == "progress":
            bar.advance(msg[2])
        elif what == "warning":
            bar.write(warning_line(jobs[index].src, msg[2]))
        elif what == "done" and index not in finished:
            finished.add(index)
            for pid in [pid for pid, i in running.items() if i == index]:
                del running[pid]
            done(jobs[index], msg[2], msg[3])

    try:
        while len(finished) < len(jobs):
            try:
                handle(results.get(timeout=0.2))
            except queue.Empty:
                if any(p.exitcode is not None and p.pid in running for p in procs) \
                        or not any(p.is_alive() for p in procs):
                    _drain(results, handle)  # what they sent before exiting
                    _reap_dead(procs, running, jobs, finished, done)
                if not any(p.is_alive() for p in procs):
                    for index, job in enumerate(jobs):
                        if index not in finished:
                            finished.add(index)
                            done(job, None, "not converted: every worker process died")
    except BaseException:
        _stop(procs)
        for index in running.values():
            if index not in finished:
                remove_temp_files(jobs[index].dst)
        raise
    finally:
        for p in procs:
            p.join(timeout=5)
        tasks.cancel_join_thread()
        results.cancel_join_thread()


def _drain(results: multiprocessing.Queue, handle: Callable[[tuple], None]) -> None:
    while True:
        try:
            handle(results.get(timeout=0.05))
        except queue.Empty:
            return


def _reap_dead(procs: list, running: dict[int, int], jobs: list[Job], finished: set[int],
               done: DoneFn) -> None:
    """A worker that died mid-job (killed, out of memory) fails that job, not the batch."""
    for p in procs:
        if p.exitcode is not None and p.pid in running:
            index = running.pop(p.pid)
            if index not in finished:
                finished.add(index)
                remove_temp_files(jobs[index].dst)
                done(jobs[index], None, f"worker process died (exit status {p.exitcode})")


def _stop(procs: list) -> None:
    """SIGTERM every worker (each removes its partial output), then make sure they are gone."""
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            p.join(timeout=1)


# --------------------------------------------------------------------------- signals


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """Treat :data:`STOP_SIGNALS` (SIGTERM, SIGHUP, SIGQUIT) like Ctrl-C (KeyboardInterrupt),
    so cleanup runs and partial files go."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
