"""How a tl process stops: SIGTERM becomes an exception in the main thread (every `finally` and atomic
write cleans up as for Ctrl-C), helper threads stay silent once a stop has begun (the user gets the
stop's one line), and a stop that lands in a finalizer is delivered again. `install` sets it up.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


MAIN_PID: int | None = None  # the tl process; DataLoader workers forked from it inherit the hooks


def install() -> None:
    """SIGTERM handling (unless someone set their own) and the hooks, for a tl process."""
    global MAIN_PID
    MAIN_PID = os.getpid()
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, terminated)
    threading.excepthook = thread_excepthook
    sys.excepthook = process_excepthook
    sys.unraisablehook = unraisable


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every `finally` and atomic write cleans up as for Ctrl-C."""


class Interrupted(BaseException):
    """Ctrl-C, past the command (the CLI's group turns KeyboardInterrupt into this: see cli.TlGroup)."""


STOPPING = threading.Event()  # set once SIGTERM or Ctrl-C has begun taking the process down
LOST_WORKERS: list[RuntimeError] = []  # a decoding worker's death reported inside a finalizer (see unraisable)


def terminated(signum, frame):
    STOPPING.set()
    raise Terminated()


def thread_excepthook(args) -> None:
    """While the process is being stopped, helper threads that lose their peers on the way down
    (multiprocessing's fd sharer, mid-handshake with a DataLoader worker being killed) stay silent: the
    one line the user gets is the stop's own. Any other time, Python's own report."""
    if not STOPPING.is_set() and not _sharer_lost_its_peer(args.exc_type, args.exc_traceback):
        threading.__excepthook__(args)


def process_excepthook(kind, value, traceback) -> None:
    """The same silence for threads that report through `sys.excepthook` themselves rather than
    `threading.excepthook`: multiprocessing's resource sharer (`_serve`) does, and its
    ConnectionResetError after a stop is what reached the user. A DataLoader worker runs that server
    too, and learns of the stop only when the tl process is gone: its sharer's lost connection is
    silent as well (the tl process reports any real failure of its workers itself)."""
    if not STOPPING.is_set() and not _sharer_lost_its_peer(kind, traceback):
        sys.__excepthook__(kind, value, traceback)


def _sharer_lost_its_peer(kind, traceback) -> bool:
    """An OSError, or the EOFError of a connection closed before its request (the tl process gone between
    accept and recv), in multiprocessing's fd-sharing server, in a process forked from the tl process."""
    if MAIN_PID is None or os.getpid() == MAIN_PID or kind is None or not issubclass(kind, (OSError, EOFError)):
        return False
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
            return True
        traceback = traceback.tb_next
    return False


def unraisable(report) -> None:
    """A stop that lands while Python runs a weakref callback or a `__del__` is "ignored" there (printed,
    then the run went on to exit 0, seen once in CI): it is delivered again, so the stop still happens,
    with its one line. A decoding worker's death that torch raised there is kept for the loader to raise
    (LOST_WORKERS). Anything else, Python's own report."""
    kind = report.exc_type
    if kind is not None and issubclass(kind, (Terminated, KeyboardInterrupt)):
        # sent from another thread a moment later: raised inside this hook, it would be ignored once more
        # (and if it lands in a finalizer again, this hook sends it again)
        number = signal.SIGTERM if issubclass(kind, Terminated) else signal.SIGINT
        timer = threading.Timer(0.05, os.kill, (os.getpid(), number))
        timer.daemon = True
        timer.start()
        return
    if kind is not None and issubclass(kind, RuntimeError) and os.getpid() == MAIN_PID \
            and "DataLoader worker" in str(report.exc_value):
        # a worker's death that torch's SIGCHLD handler raised while a finalizer ran: printed as "Exception
        # ignored" and lost, the run went on; the loader raises it at its next batch (hardware.WorkerLoader)
        LOST_WORKERS.append(report.exc_value)
        return
    if not STOPPING.is_set():  # once stopping, a finalizer's error (a DataLoader whose workers the stop took
        sys.__unraisablehook__(report)  # down too) is part of the stop, whose one line the user gets


RESUMES = ("tl extract resumes its shards, tl sweep its heads; tl finetune: add --resume; tl run resumes "
           "them all")
RESUME_HINT = f"nothing finished was lost: run the same command again ({RESUMES})"


def launched_ranks() -> int:
    """How many processes torchrun says it started (WORLD_SIZE); 1 without it, or when it is not a number
    (pipeline.distributed.world refuses that where the ranks matter)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def terminated_line() -> str:
    """What a process stopped by SIGTERM says; under torchrun, which rank, and why every rank got it."""
    where = (f"rank {os.environ.get('RANK', '?')} stopped by SIGTERM (torchrun stops every rank when one fails "
             "or when it is stopped itself)") if launched_ranks() > 1 else "stopped by SIGTERM"
    return f"{where}; {RESUME_HINT}"
