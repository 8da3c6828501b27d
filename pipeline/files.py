"""Files a user keeps: atomic writes, the writer's lock, stale temporaries, outputs that are inputs, digests.

Kept free of torch so the cache store can use it without loading a model framework.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Iterator

from pipeline.class_folders import linked_classes
from pipeline.errors import TLError

# errno values that mean "no room for this write": a full disk or quota, or a file past its size limit (EFBIG)
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{8}))?$")  # no host: an earlier tl's
# a pid means a process of its host only: torchrun ranks on other nodes write beside us on a shared file system
HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


class DiskFullError(TLError):
    """No space left (or a file-size limit reached) while writing a file: `reason` says which, of what path,
    and `remedy` what makes room, for a caller that words the rest of the line itself: `in_place` what makes
    room where the file is (a run that resumes from there needs it), `elsewhere` a remedy that writes
    somewhere else instead, where there is one."""

    def __init__(self, message: str, reason: str = "", remedy: str = "free space", in_place: str = "",
                 elsewhere: str = ""):
        super().__init__(message)
        self.reason, self.remedy = reason or message.partition("; ")[0], remedy
        self.in_place, self.elsewhere = in_place or remedy, elsewhere

    def resumed(self, then: str, kept: str = "") -> "DiskFullError":
        """This line for a run that goes on from what it wrote where it is (`kept`, said after the reason): room
        made in place, then `then`; another file system (EFBIG) is a new output, said as the start over it is."""
        return DiskFullError(f"{self.reason}{kept}; {self.in_place}{then}" + (
            f"; or {self.elsewhere} (an --out there starts over)" if self.elsewhere else ""), self.reason,
            self.remedy, self.in_place, self.elsewhere)


def disk_full(error_number: int, path, then: str = " and re-run the same command") -> DiskFullError:
    """The one line for a write that found no room at `path`. EFBIG is not a full disk: the file outgrew the
    largest its file system takes, or the process's `ulimit -f` (Python ignores SIGXFSZ, so the write fails),
    and freeing space would not help. EDQUOT: the user's quota is full, not the disk (`df` shows room)."""
    elsewhere = ""
    if error_number == errno.EFBIG:
        reason = f"{path} is too large for its file system or the limit `ulimit -f`"
        in_place, elsewhere = "raise the limit", "write to another file system"
    elif error_number == errno.EDQUOT:  # the disk has room; this user's share of it is used up
        reason, in_place = f"the disk quota on the file system of {path} is used up", "free space within it"
    else:
        reason, in_place = f"no space left on the device of {path}", "free space"
    remedy = f"{in_place} or {elsewhere}" if elsewhere else in_place
    # 'or write elsewhere, and re-run the same command' would name the same path again: each remedy its own way
    return DiskFullError(f"{reason}; {in_place}{then}" + (f", or {elsewhere} instead" if elsewhere else ""), reason,
                         remedy, in_place, elsewhere)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    """`.NAME.tmp-PID-HOST` beside `path` (HOST: a digest of the host name): unique to this process on any
    node sharing the folder, hidden, recognisable as ours."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{HOST}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete `.NAME.tmp-PID-HOST` files in `folder` (of one target `name`, or of any) whose process is dead:
    what a killed run left behind. Only this host can tell: another host's are left to it (a rank on another
    node writing its listings is alive there, whatever pid runs here). Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or (name is not None and match["name"] != name) or match["host"] not in (None, HOST):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def _prepared(path: Path, what: str, sweep: bool, follow: bool = True) -> Path:
    """The file to replace (with `follow`, a symlink's target: the link is kept), its folders made and, with
    `sweep`, the stale temporaries of dead runs beside it cleared. `follow=False` is for the files tl names
    itself inside an output folder (shards, manifests, records, reports): a link planted there is replaced,
    never written through, so a folder handed over cannot send a write outside it."""
    path = Path(path)
    if path.is_dir() and (follow or not path.is_symlink()):
        if not follow:  # a name tl gives inside a folder the user named: no flag names another
            raise TLError(f"{path} is a folder, where tl writes a {what}; move it away and run the command again")
        raise TLError(f"{path} is a folder; name a {what} inside it")
    if path.is_symlink() and follow:  # a path the user named: write the file the link names, and keep the link
        path = Path(os.path.realpath(path))
    if follow:  # a node planted among tl's own names is replaced, as a planted link is
        refuse_special(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a part of the path is not a folder: say which
        check_folders(path, what)
        raise
    if sweep:
        remove_stale_temporaries(path.parent, path.name)
    return path


def refuse_special(path: Path, what: str) -> None:
    """A FIFO, device or socket at `path` (or where its link leads) is no file to replace: the rename of an
    atomic write would put a file in its place (as root, `--out /dev/null` would replace the system's)."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise TLError(f"cannot write {what} {path}: it is a device, pipe or socket, not a file; choose another path")


def check_folders(path: Path, what: str) -> None:
    """Refuse, in one line and before any work, a path one of whose folders is a file or a link to nothing,
    or whose nearest existing folder takes no new file (a read-only file system, a folder the user may not
    write): found by making and removing a temporary there, not after the work whose result it would hold."""
    part = next((p for p in Path(path).parents if os.path.lexists(p) and not p.is_dir()), None)
    if part is not None:
        kind = "a link to nothing" if part.is_symlink() and not part.exists() else "a file"
        raise TLError(f"cannot write {what} {path}: {part} is {kind}, not a folder; choose another path")
    real = Path(os.path.realpath(path))  # a link's target is what gets written (see _prepared)
    refuse_special(real, what)
    probe = temporary_name(next(p for p in real.parents if p.is_dir()) / real.name)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(probe)
    except FileExistsError:  # a temporary of ours already there: the folder took a file
        return
    except OSError as exc:
        raise _write_error(exc, Path(path), what) from None


def _write_error(exc: OSError, path: Path, what: str) -> TLError:
    if exc.errno in FULL:
        return disk_full(exc.errno, path)
    return TLError(f"cannot write {what} {path}: {exc.strerror or exc}; choose another path")


@contextlib.contextmanager
def atomic_write(path: Path, what: str = "file", sweep: bool = True, follow: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path` in one step, so
    a reader sees the old file or the new one. On any failure (a full disk, Ctrl-C, an error) the
    temporary is removed and `path` is untouched. Stale temporaries of dead runs are cleared first.
    OSErrors become one-line TLErrors naming `what` was being written. Writers that could fail in a
    library with an opaque error (HDF5, torch.save) serialise to memory first and write bytes here.
    `sweep=False` skips the look for stale temporaries (a listing of the folder), for writers of many
    files in one folder that cleared it once already (cache shards). `follow=False`: see _prepared."""
    temporary = path
    try:
        path = _prepared(path, what, sweep, follow)
        temporary = temporary_name(path)
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        if temporary != path:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise _write_error(exc, path, what) from None
    except BaseException:
        if temporary != path:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable: the new name is in the folder's own data, not the file's."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_bytes(path: Path, data: bytes, what: str = "file", sweep: bool = True, follow: bool = True) -> None:
    """`data` as the whole content of `path`, atomically (see atomic_write)."""
    write_together([(path, data, what)], sweep, follow)


def write_together(files: list[tuple], sweep: bool = True, follow: bool = True) -> None:
    """Files that belong together (an export and its contract), each (path, data, what), or (path, data,
    what, follow) for one whose `follow` differs (a path the user named among tl's own): every one is
    written and fsynced beside its path before the first replaces its path, so a full disk or an error
    while writing keeps all the earlier files; only the renames, back to back, are left to fail between."""
    written: list[tuple[Path, Path]] = []
    path, what = Path(files[0][0]), files[0][2]
    try:
        for path, data, what, *own in files:
            path = _prepared(path, what, sweep, own[0] if own else follow)
            written.append((temporary_name(path), path))
            with open(written[-1][0], "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for temporary, path in written:
            os.replace(temporary, path)
        for folder in dict.fromkeys(path.parent for _, path in written):
            _fsync_folder(folder)
    except BaseException as exc:
        for temporary, _ in written:
            with contextlib.suppress(OSError):
                temporary.unlink()
        if isinstance(exc, OSError):
            raise _write_error(exc, path, what) from None
        raise


def missing_folders(path: Path) -> list[Path]:
    """The folders that making `path` (a folder) would create, deepest first."""
    missing, path = [], Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


class OutputLock:
    """An exclusive lock on an output (a cache folder, a model file) for one writing process.

    A POSIX record lock (`lockf`): it belongs to this process alone, so DataLoader workers forked
    while it is held do not inherit it, and the kernel drops it the moment this process dies: a
    re-run right after a kill never waits for orphaned workers. The file holds the holder's pid for
    the message; a pid that is no longer alive is never named.

    Releasing removes the lock file, and then the folders this output made (`made`, and those made
    for the lock) where they are still empty, so a run that failed leaves nothing behind. The file is
    unlinked while still locked; a process that opened it just before then holds a lock on a file no
    longer in place, sees so, and opens the path again: one holder at a time, always."""

    _held: set[str] = set()  # record locks do not exclude the process that holds them: these do

    def __init__(self, lock_path: Path, what: str, error: type[TLError] = TLError, made: list[Path] = ()):
        self.path = Path(lock_path)  # callers name it from the output's real path: a link must not dodge it
        self.what = what  # "writing to caches/x", for the message
        self.error = error
        self.made = list(made)  # folders the caller made for this output, deepest first
        self.handle = None

    def _refuse(self, holder: str) -> None:
        raise self.error(f"another tl process{holder} is {self.what}; wait for it to finish or stop it") from None

    def acquire(self) -> "OutputLock":
        key = self._key = os.path.realpath(self.path)
        if key in OutputLock._held:
            self._refuse(f" (pid {os.getpid()})")
        self.made = missing_folders(self.path.parent) + self.made
        while True:
            handle = self._lock_file()
            if self._in_place(handle):
                break
            handle.close()  # the holder released (and unlinked) it between our open and our lock
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError as exc:  # a full disk shows here first when a run starts again on it
            with contextlib.suppress(OSError):  # closing flushes the pid again
                handle.close()
            if exc.errno in FULL:
                raise disk_full(exc.errno, self.path) from None
            raise self.error(f"cannot write the lock {self.path}: {exc.strerror}; choose another output") from None
        self.handle = handle
        OutputLock._held.add(key)
        return self

    def _lock_file(self):
        """The lock file, open and locked by this process; a refusal when another process holds it."""
        for attempt in range(5):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+")
                break
            except OSError as exc:  # ENOENT: a releasing holder removed the empty folder between the two calls
                if not isinstance(exc, FileNotFoundError) or attempt == 4:
                    raise self.error(f"cannot create {self.path}: {exc.strerror}; choose another output") from None
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                raise self.error(f"cannot lock {self.path}: {exc.strerror}; choose another output") from None
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            self._refuse(f" (pid {text})" if text.isdigit() and pid_alive(int(text)) else "")
        return handle

    def release(self) -> None:
        if self.handle is not None:
            # unlinked while still locked (see the class's note), and only while it is still ours: a
            # file at the path now is another run's, after someone removed the output under this one
            ours = self._in_place(self.handle)
            if ours:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            with contextlib.suppress(OSError):
                fcntl.lockf(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
            OutputLock._held.discard(self._key)
            for folder in self.made if ours else ():
                with contextlib.suppress(OSError):  # not empty: it holds the output, or another's files
                    folder.rmdir()

    def _in_place(self, handle) -> bool:
        """Whether the open lock file is the one at the path (not unlinked, nor replaced)."""
        try:
            return os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def file_lock(out: Path, what: str, error: type[TLError] = TLError) -> OutputLock:
    """The lock of an output file (a head, a model): `.NAME.lock` beside the file that a link names, so a
    symlink to another run's output takes that run's lock."""
    real = Path(os.path.realpath(out))
    return OutputLock(real.with_name(f".{real.name}.lock"), what, error)


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file (or folder), links and `..` included; a missing path names
    the file it would create."""
    first, second = Path(first), Path(second)
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second) \
            or first.resolve() == second.resolve()
    except OSError:
        return False


def inside(path: Path, folder: Path, as_named: bool = False) -> bool:
    """Whether `path` (existing or not) lies in `folder` (an existing folder), links resolved; `as_named`: or as
    the paths are named, for an input read through its links (an imagefolder's walk follows a class folder that
    links to images kept elsewhere: an output under it lands among them). Not for a path read from a file."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(os.path.commonpath([where(path), where(folder)]) == where(folder)
               for where in (os.path.realpath, _named)[:1 + as_named])


def _named(path) -> str:
    """`path` absolute as named, its links kept, but a `..` taken where the system takes it: from what the
    path before it resolves to (D/cat/../x, with D/cat a link to /kept/cats, is /kept/x, not D/x)."""
    named = Path(os.getcwd(), path)
    found = Path(named.anchor)
    for part in named.parts[1:]:
        found = Path(os.path.realpath(found)).parent if part == ".." else found / part
    return str(found)


def refuse_overwriting_inputs(outputs: dict[str, Path | None], inputs: dict[str, Path | None],
                              protected: tuple[str, ...] = ()) -> None:
    """One line, before anything is written, when an output names one of the command's own inputs or
    lies inside an input folder named in `protected` (a cache, an imagefolder, whose every file counts)."""
    for out_flag, out_path in outputs.items():
        flag = out_flag.split("'s ")[0]  # "--out's checkpoint" is named by --out
        for in_flag, in_path in inputs.items():
            if out_path is None or in_path is None:
                continue
            if same_file(out_path, in_path):  # a folder is named as one: evaluate --out C is the cache, no file
                what = (f"the {in_flag} folder; writing there would change" if Path(in_path).is_dir()
                        else f"the same file as {in_flag}; writing it would destroy")
                raise TLError(f"{out_flag} {out_path} is {what} the input: choose another {flag}")
            how = in_input(out_path, in_path) if in_flag in protected else None
            if how is not None:
                raise TLError(f"{out_flag} {out_path} lies inside {in_flag} {in_path}{how}; writing there would "
                              f"change the input: choose another {flag}")


def in_input(path: Path, folder: Path) -> str | None:
    """Whether `path` lies in an input `folder` read through its links, and how: '' (as named or resolved), ' (its
    folder NAME links there)' (named by where a class folder of images kept elsewhere leads, in the folder or in a
    split folder of it: train/a); None: it does not. Links further down are not looked for: a walk of the input."""
    if inside(path, folder, as_named=True):
        return ""
    return next((f" (its folder {name} links there)" for name, linked in linked_classes(folder)
                 if inside(path, linked)), None)
