"""Faults a hostile or clumsy user causes (issue #11): kills, SIGTERM, a full disk, outputs that are
inputs, edited manifests, flipped bits, leftovers, unreadable images in finetune, and bad settings.

Each ends in one `error:` line and exit 2 (143 for SIGTERM), or in a recorded skip; nothing already
written is lost, and a re-run finishes what was started. Data-set faults are in test_faults_data.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.reader import CacheReader
from pipeline.files import file_digest
from tests.conftest import REPO, blobs, cache_document, make_image_folder, write_cache_document, write_code_cache, write_image

FAST = ["--backbone", "alexnet", "--weights", "none", "--layers", "fc7", "--quiet"]


def assert_one_line_error(result, *fragments, code=2):
    assert result.code == code, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


class Run:
    """A finished `python -m cli` subprocess, shaped like the in-process CliResult."""

    def __init__(self, completed):
        self.code, self.out, self.err = completed.returncode, completed.stdout, completed.stderr

    def __repr__(self):
        return f"Run(code={self.code}, out={self.out!r}, err={self.err!r})"


def tl_process(*args, file_limit: int | None = None, timeout=300) -> Run:
    """`tl ARGS` as its own process; `file_limit` caps the bytes any one file may reach (RLIMIT_FSIZE):
    past it writes fail with EFBIG, a write with no room as on a full disk but its own line (`ulimit -f`),
    instead of killing the process with SIGXFSZ."""

    def limit():
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    completed = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, capture_output=True,
                               text=True, preexec_fn=limit, timeout=timeout)
    return Run(completed)


def manifest_of(cache: Path) -> dict:
    return cache_document(cache)


def shards_in(cache: Path) -> int:
    try:
        return len(manifest_of(cache)["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob(".*.tmp*"))


def same_cache(first: Path, second: Path, tap: str = "fc7") -> None:
    a, b = CacheReader(first), CacheReader(second)
    assert list(a.load_column("sample_id")) == list(b.load_column("sample_id"))
    np.testing.assert_array_equal(a.load(tap), b.load(tap))
    np.testing.assert_array_equal(a.load_column("target"), b.load_column("target"))


# ------------------------------------------------------------------ kills, SIGTERM, the lock


def _start(args: list, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "extract", "--out", str(cache), *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(process: subprocess.Popen, cache: Path, more_than: int, deadline: float) -> None:
    while time.monotonic() < deadline and process.poll() is None and shards_in(cache) <= more_than:
        time.sleep(0.01)


@pytest.mark.parametrize("mode, kills", [("images", 5), ("multiscale", 2)])
def test_rerun_right_after_sigkill_is_never_refused(tmp_path, voc_shapes, mode, kills):
    """SIGKILL the main process while its DataLoader workers run, then start again at once: the lock
    died with the process (workers never held it), so every re-run proceeds, and the final cache
    equals an unbroken run's."""
    if mode == "images":
        data = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=12)
        args = ["--data", data, "--shard-rows", "2", "--batch-size", "1", "--dtype", "float32", "--workers", "2",
                *FAST]
    else:
        args = ["--format", "voc", "--data", voc_shapes, "--classes", "auto", "--split", "test", "--multiscale", "--scales", "1,2",
                "--shard-rows", "1", "--batch-size", "8", "--dtype", "float32", "--workers", "2", *FAST]
    cache = tmp_path / "killed"
    deadline = time.monotonic() + 240
    for kill in range(kills):
        before = shards_in(cache)
        process = _start(args, cache)
        _wait_for_shards(process, cache, before, deadline)
        if process.poll() is not None:  # it finished or was refused before a kill could land
            assert process.returncode == 0 and kill > 0, process.stderr.read()
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert "another tl process" not in process.stderr.read()
        assert shards_in(cache) > before  # each run, started right after a kill, got the lock and wrote
    final = tl_process("extract", "--out", cache, *args)
    assert final.code == 0, final
    straight = tmp_path / "straight"
    assert tl_process("extract", "--out", straight, *args).code == 0
    same_cache(cache, straight)
    assert leftovers(cache) == []


def test_forked_children_do_not_hold_the_lock(tmp_path):
    """The mechanism behind the test above, without its timing: a child forked while the lock is held
    (as DataLoader workers are) outlives its SIGKILLed parent, and the lock is free all the same."""
    from pipeline.files import OutputLock, pid_alive

    script = ("import os, sys, time\nfrom pipeline.files import OutputLock\n"
              "lock = OutputLock(sys.argv[1], 'writing').acquire()\n"
              "child = os.fork()\nif child == 0:\n    time.sleep(30)\n    os._exit(0)\n"
              "print(child, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / ".lock")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        with pytest.raises(Exception, match=f"pid {parent.pid}"):
            OutputLock(tmp_path / ".lock", "writing").acquire()
        parent.kill()
        parent.wait()
        assert pid_alive(child)
        OutputLock(tmp_path / ".lock", "writing").acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_released_lock_leaves_no_file_and_no_folder_it_made(tmp_path):
    from pipeline.files import OutputLock

    lock = OutputLock(tmp_path / "new" / "dir" / ".m.pt.lock", "training").acquire()
    assert (tmp_path / "new" / "dir" / ".m.pt.lock").is_file()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the lock file and both folders it made are gone
    lock = OutputLock(tmp_path / "new" / ".m.pt.lock", "training").acquire()
    (tmp_path / "new" / "m.pt").write_text("the output")
    lock.release()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["m.pt"]  # a folder holding the output stays


def test_a_lock_on_a_file_its_holder_just_unlinked_is_taken_again(tmp_path, monkeypatch):
    """The holder releases (unlinks, then unlocks) between another process's open and its lock: that
    process then holds a lock on a file no longer in place, and must open the path anew."""
    from pipeline.files import OutputLock

    path, calls, original = tmp_path / ".lock", [], OutputLock._lock_file

    def released_meanwhile(self):
        handle = original(self)
        if not calls:
            path.unlink()
        calls.append(handle)
        return handle

    monkeypatch.setattr(OutputLock, "_lock_file", released_meanwhile)
    lock = OutputLock(path, "writing").acquire()
    lock.handle.seek(0)  # not path.read_text(): closing any other handle on it drops this process's lock
    assert len(calls) == 2 and lock.handle.read() == str(os.getpid())
    assert os.path.samestat(os.fstat(lock.handle.fileno()), os.stat(path))
    other = subprocess.run([sys.executable, "-c", "import sys\nfrom pipeline.files import OutputLock\n"
                            "OutputLock(sys.argv[1], 'writing').acquire()", str(path)],
                           cwd=REPO, capture_output=True, text=True)
    assert other.returncode != 0 and f"another tl process (pid {os.getpid()})" in other.stderr
    lock.release()
    assert not path.exists()


def test_a_lock_file_is_unlinked_while_locked_and_only_while_it_is_its_own(tmp_path, monkeypatch):
    """Unlinked before it is unlocked (else a process locking it in between holds a file about to go);
    and a run whose output someone removed while it ran never unlinks the next run's lock file."""
    import fcntl

    from pipeline import files
    from pipeline.files import OutputLock

    path, at_unlock = tmp_path / "out" / ".lock", []
    lockf = fcntl.lockf

    def watched(handle, operation, *more):
        if operation == fcntl.LOCK_UN:
            at_unlock.append(path.exists())
        return lockf(handle, operation, *more)

    monkeypatch.setattr(files.fcntl, "lockf", watched)
    OutputLock(path, "writing").acquire().release()
    assert at_unlock == [False]
    monkeypatch.setattr(files.fcntl, "lockf", lockf)

    first = OutputLock(path, "writing").acquire()
    path.unlink()
    path.parent.rmdir()  # the user removed the output under the first run, and started a second
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.files import OutputLock\n"
         "lock = OutputLock(sys.argv[1], 'writing').acquire(); print('locked', flush=True); time.sleep(60)", str(path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        first.release()
        assert path.is_file()  # the second run's, still in place
        with pytest.raises(Exception, match=f"another tl process \\(pid {holder.pid}\\)"):
            OutputLock(path, "writing").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_is_one_line_exit_143_and_resumes(tmp_path):
    data = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=10)
    args = ["--data", data, "--shard-rows", "2", "--batch-size", "1", "--dtype", "float32", "--workers", "1",
            *FAST]
    cache = tmp_path / "c"
    process = _start(args, cache)
    _wait_for_shards(process, cache, 0, time.monotonic() + 120)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    err = process.stderr.read()
    assert process.returncode == 143, err
    assert err.strip().splitlines() == [err.strip()] and "SIGTERM" in err and "run the same command" in err
    assert "tl sweep its heads" in err  # every command that resumes is named
    assert "Traceback" not in err
    kept = shards_in(cache)
    assert kept >= 1
    resumed = tl_process("extract", "--out", cache, *args)
    assert resumed.code == 0 and f"{kept} reused" in resumed.out, resumed
    assert leftovers(cache) == []


def test_a_decoding_worker_killed_by_sigkill_is_one_line_and_resumes(tmp_path):
    """The out-of-memory killer's SIGKILL of a worker reached the user as torch's RuntimeError traceback
    (raised from its SIGCHLD handler wherever the main process was) and exit 1."""
    data = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=10)
    args = ["--data", data, "--shard-rows", "2", "--batch-size", "1", "--dtype", "float32", "--workers", "1",
            *FAST]
    cache = tmp_path / "c"
    process = _start(args, cache)
    _wait_for_shards(process, cache, 0, time.monotonic() + 120)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    own = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    workers = [int(pid) for pid in children if Path(f"/proc/{pid}/cmdline").read_bytes() == own]  # forked: its argv
    assert workers, children
    os.kill(workers[0], signal.SIGKILL)
    process.wait(timeout=120)
    err = process.stderr.read()
    assert process.returncode == 2 and err.startswith("error: a decoding worker was killed by signal Killed"), err
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    kept = shards_in(cache)
    resumed = tl_process("extract", "--out", cache, *args)
    assert resumed.code == 0 and f"{kept} reused" in resumed.out, resumed


def test_what_a_lost_worker_is_follows_torchs_words():
    """torch's RuntimeErrors for a lost worker, as its DataLoader words them: a stop's signal is that stop,
    any other death (or the pin-memory thread's) one line naming the signal; a worker's own error that
    torch re-raises ("Caught ...") stays that error."""
    from pipeline import stops
    from pipeline.errors import TLError
    from pipeline.hardware import lost_worker

    killed = lost_worker(RuntimeError("DataLoader worker (pid 11338) is killed by signal: Killed. "))
    assert isinstance(killed, TLError) and str(killed).startswith("a decoding worker was killed by signal Killed (")
    crashed = lost_worker(RuntimeError("DataLoader worker (pid 7) is killed by signal: Segmentation fault. "))
    assert "killed by signal Segmentation fault" in str(crashed)
    for text in ("DataLoader worker (pid(s) 12, 13) exited unexpectedly", "Pin memory thread exited unexpectedly",
                 "DataLoader timed out after 600 seconds"):
        assert str(lost_worker(RuntimeError(text))).startswith("a decoding worker died or could not hand over"), text
    # torch noticed the death before its SIGCHLD handler ran: the workers' exit codes name the signal
    noticed = RuntimeError("DataLoader worker (pid(s) 12) exited unexpectedly")
    assert str(lost_worker(noticed, [None, -signal.SIGKILL])).startswith("a decoding worker was killed by signal Killed (")
    assert str(lost_worker(noticed, [None, 1])).startswith("a decoding worker died or could not hand over")
    stopping = stops.STOPPING
    try:
        stops.STOPPING = __import__("threading").Event()
        assert isinstance(lost_worker(RuntimeError("DataLoader worker (pid 9) is killed by signal: Terminated. ")),
                          stops.Terminated) and stops.STOPPING.is_set()
        assert isinstance(lost_worker(RuntimeError("DataLoader worker (pid 9) is killed by signal: Interrupt. ")),
                          KeyboardInterrupt)
        assert isinstance(lost_worker(noticed, [-signal.SIGTERM]), stops.Terminated)
    finally:
        stops.STOPPING = stopping
    for text in ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback: ... timed out",
                 "CUDA error: an illegal memory access was encountered",
                 "A compilation subprocess exited unexpectedly"):
        assert lost_worker(RuntimeError(text)) is None, text
    assert lost_worker(ValueError("DataLoader worker (pid 1) exited unexpectedly")) is None


@contextlib.contextmanager
def lock_held_elsewhere(lock_path: Path):
    """Another process holding the output lock at `lock_path` (as a running tl would); yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.files import OutputLock; "
         "lock = OutputLock(sys.argv[1], 'x').acquire(); print('locked', flush=True); time.sleep(60)",
         str(lock_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_finetune_on_one_out_is_refused(run_tl, tmp_path, small_head):
    with lock_held_elsewhere(tmp_path / ".m.pt.lock") as pid:
        result = run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt",
                        "--out", tmp_path / "m.pt", "--epochs", "0", "--workers", "0", "--quiet")
        assert_one_line_error(result, f"another tl process (pid {pid}) is training into")
        assert not (tmp_path / "m.pt").exists()
    assert run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt",
                  "--out", tmp_path / "m.pt", "--epochs", "0", "--workers", "0", "--quiet").code == 0


def test_a_pipe_or_device_at_out_is_refused_not_replaced(run_tl, tmp_path, small_head):
    """A FIFO (or a device node, or a link to one) at --out was replaced by the head file: the atomic write's
    rename put a file in its place, exit 0 (as root, `--out /dev/null` would replace the system's). Refused
    in one line before any training, the node kept; the same check guards every atomic write."""
    from pipeline.errors import TLError
    from pipeline.files import write_bytes

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link.pt").symlink_to(fifo)
    for out in (fifo, tmp_path / "link.pt"):
        result = run_tl("fit-head", "--cache", small_head / "cache", "--out", out, "--quiet")
        assert_one_line_error(result, f"cannot write head file {out if out == fifo else fifo}: it is a device, "
                                      "pipe or socket, not a file; choose another path")
    assert fifo.is_fifo() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with pytest.raises(TLError, match="it is a device, pipe or socket"):
        write_bytes(fifo, b"x", "report")


def test_a_second_fit_head_on_one_out_is_refused(run_tl, tmp_path, small_head):
    """Two fit-heads into one --out both said 'wrote OUT', the file holding whichever finished last; the head
    file now has finetune's lock, which a link to it takes too, and nothing is left of it afterwards."""
    earlier = (small_head / "head.pt").read_bytes()
    (tmp_path / "h.pt").write_bytes(earlier)
    (tmp_path / "link.pt").symlink_to(tmp_path / "h.pt")
    with lock_held_elsewhere(tmp_path / ".h.pt.lock") as pid:
        for out in ("h.pt", "link.pt"):
            result = run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / out, "--quiet")
            assert_one_line_error(result, f"another tl process (pid {pid}) is training into {tmp_path / out}")
        assert (tmp_path / "h.pt").read_bytes() == earlier
    assert run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / "h.pt", "--quiet").code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.pt", "link.pt"]


def test_an_out_that_holds_a_file_tl_did_not_write_is_refused_before_the_work(run_tl, tmp_path, small_head,
                                                                             monkeypatch):
    """`--out notes.txt` by mistake replaced the notes with a head (or a model) without a word: a file there
    that tl did not write (not a tl head or model: a zip of photos, a torch.save state dict neither) is refused in
    one line and kept, unless --overwrite; an empty one, or a head of an earlier run, is replaced."""
    import zipfile

    notes, photos = tmp_path / "notes.txt", tmp_path / "photos.zip"
    notes.write_text("three weeks of notes\n")
    with zipfile.ZipFile(photos, "w") as archive:
        archive.writestr("a.jpg", b"not a head")
    weights = tmp_path / "weights.pth"  # torch's zip archive too, but no tl file
    torch.save({"fc.weight": torch.zeros(2, 3)}, weights)
    kept = {path: path.read_bytes() for path in (notes, photos, weights)}
    for stage in (["fit-head", "--cache", small_head / "cache"],
                  ["finetune", "--data", small_head / "train", "--head", small_head / "head.pt", "--epochs", "0"]):
        what = "head file" if stage[0] == "fit-head" else "model file"
        for out in (notes, photos, weights):
            refused = run_tl(*stage, "--out", out, "--quiet")
            assert_one_line_error(refused, f"{out} holds a file that tl did not write as a {what}; choose another "
                                           "--out, or pass --overwrite to replace it")
            assert out.read_bytes() == kept[out]
    assert not any(path.name.endswith(".lock") or ".tmp-" in path.name for path in tmp_path.iterdir())
    with monkeypatch.context() as patch:  # unreadable (chmod 0; root reads any file): the rename would replace it
        patch.setattr(zipfile, "ZipFile", lambda *args: open("/nonexistent/unreadable"))
        assert run_tl("fit-head", "--cache", small_head / "cache", "--out", weights, "--quiet").code == 2
    assert weights.read_bytes() == kept[weights]
    (tmp_path / "empty.pt").write_bytes(b"")
    for out in ("empty.pt", "empty.pt"):  # the second: the head the first wrote
        assert run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / out, "--quiet").code == 0
    assert run_tl("fit-head", "--cache", small_head / "cache", "--out", notes, "--overwrite", "--quiet").code == 0
    assert run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt", "--epochs", "0",
                  "--out", notes, "--overwrite", "--quiet").code == 0
    assert notes.read_bytes() != kept[notes] and zipfile.is_zipfile(notes)


# ------------------------------------------------------------------ a full disk


def test_full_disk_during_extract_keeps_finished_shards(tmp_path):
    """A file-size limit (EFBIG) stands for the full disk here; its line says so and not 'free space', which would
    not help (test_a_file_size_limit_is_not_called_a_full_disk has ENOSPC's line)."""
    data = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=6)
    (data / "a" / "img00b.png").write_bytes(b"unreadable")  # shard 0 holds one row, the others two
    args = ["--data", data, "--shard-rows", "2", "--dtype", "float32", "--workers", "0", *FAST]
    cache = tmp_path / "c"
    # a file-size limit between a 1-row shard (16 KiB of codes) and a 2-row one: the first shard is
    # written, the second finds the "disk" full
    full = tl_process("extract", "--out", cache, *args, file_limit=35_000)
    assert full.code == 2, full
    lines = full.err.strip().splitlines()
    assert len(lines) == 1 and f"{cache / 'shard-00001.h5'} is too large for its file system or the limit " \
        "`ulimit -f` (1 shard kept); raise the limit and re-run the same command to resume; or write to another " \
        "file system (an --out there starts over)" in lines[0], full.err
    assert "free space" not in lines[0] and "Traceback" not in full.err
    kept = shards_in(cache)
    assert kept >= 1 and leftovers(cache) == []
    resumed = tl_process("extract", "--out", cache, *args)
    assert resumed.code == 0 and f"{kept} reused" in resumed.out, resumed
    straight = tmp_path / "straight"
    assert tl_process("extract", "--out", straight, *args).code == 0
    same_cache(cache, straight)


def test_a_worker_that_cannot_hand_over_its_batch_is_one_line_not_a_hang(tmp_path):
    """Shared memory counts against the file-size limit: a decoding worker's batch cannot be handed over.
    multiprocessing used to drop it with a traceback and leave the main process waiting forever."""
    data = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=4)
    started = time.monotonic()
    run = tl_process("extract", "--data", data, "--out", tmp_path / "c", "--workers", "1", "--batch-size", "8",
                     *FAST, file_limit=300_000, timeout=120)
    assert run.code == 2 and run.err.startswith("error: a decoding worker died"), run
    assert len(run.err.strip().splitlines()) == 1 and "--workers 0" in run.err
    assert time.monotonic() - started < 60


def test_full_disk_when_saving_a_head_or_a_model(tmp_path, small_head):
    head = tl_process("fit-head", "--cache", small_head / "cache", "--out", tmp_path / "h.pt", file_limit=4096)
    assert head.code == 2 and head.err.startswith(f"error: {tmp_path / 'h.pt'} is too large for its file system "
                                                  "or the limit `ulimit -f`; raise the limit"), head
    assert len(head.err.strip().splitlines()) == 1
    assert not (tmp_path / "h.pt").exists() and leftovers(tmp_path) == []
    model = tl_process("finetune", "--data", small_head / "train", "--head", small_head / "head.pt",
                       "--out", tmp_path / "m.pt", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                       "--quiet", file_limit=1 << 20)
    assert model.code == 2 and model.err.startswith(f"error: {tmp_path / 'm.last.ckpt'} is too large for its file "
                                                    "system or the limit `ulimit -f`; raise the limit"), model
    assert len(model.err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists() and leftovers(tmp_path) == []


def test_a_full_disk_after_a_finetune_checkpoint_says_to_resume(run_tl, tmp_path, small_head, monkeypatch):
    """A full disk at epoch 2's checkpoint said 'free space and re-run the same command', which the kept
    checkpoint of epoch 1 then refused ('holds an earlier run; pass --resume'): the line says --resume, and the
    resumed model is the unbroken run's. A run that --overwrite started and that wrote no checkpoint of its
    own keeps the plain line: the checkpoint there is the earlier run's."""
    import pipeline.finetune
    from pipeline.files import DiskFullError
    from pipeline.model_files import load_model_file

    args = ["finetune", "--data", small_head / "train", "--head", small_head / "head.pt", "--epochs", "2",
            "--batch-size", "4", "--workers", "0", "--quiet"]
    real, written = pipeline.finetune.save_checkpoint, []

    def full_after(count):
        def save(path, *rest, **options):
            if len(written) >= count:
                raise DiskFullError(f"no space left on the device of {path}; free space and re-run the same command")
            written.append(path)
            real(path, *rest, **options)
        return save

    monkeypatch.setattr(pipeline.finetune, "save_checkpoint", full_after(1))
    stopped = run_tl(*args, "--out", tmp_path / "m.pt")
    assert_one_line_error(stopped, "no space left on the device of", "free space, then run the command again with "
                          "--resume (tl run resumes by itself): it goes on from the checkpoint m.last.ckpt")
    monkeypatch.undo()
    resumed = run_tl(*args, "--out", tmp_path / "m.pt", "--resume")
    assert resumed.code == 0 and "after epoch 1" in resumed.out + resumed.err, resumed
    assert run_tl(*args, "--out", tmp_path / "straight.pt").code == 0
    mine, theirs = (load_model_file(tmp_path / name)[0].state_dict() for name in ("m.pt", "straight.pt"))
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
    written.clear()
    monkeypatch.setattr(pipeline.finetune, "save_checkpoint", full_after(0))
    replaced = run_tl(*args, "--out", tmp_path / "m.pt", "--overwrite")
    assert_one_line_error(replaced, "free space and re-run the same command")


@pytest.mark.parametrize("error_number, room", [
    (errno.ENOSPC, "no space left on the device of {path}; free space, then"),
    (errno.EDQUOT, "the disk quota on the file system of {path} is used up; free space within it, then"),
    (errno.EFBIG, "{path} is too large for its file system or the limit `ulimit -f`; raise the limit, then")])
def test_a_checkpoint_that_finds_no_room_says_to_make_room_there_and_resume(run_tl, tmp_path, small_head, monkeypatch,
                                                                             error_number, room):
    """A file-size limit at epoch 2's checkpoint said 'raise the limit or write to another file system, then run
    the command again with --resume': the resume reads the checkpoint where it is, so writing elsewhere is another
    --out and a start over. Each errno's line says what makes room in place, then --resume; another file system
    is said as the start over it is."""
    import pipeline.finetune
    from tests.conftest import disk_full_at

    real, saved = pipeline.finetune.save_checkpoint, []

    def second_full(path, *rest, **options):
        saved.append(path)
        if len(saved) == 2:  # epoch 2's: the disk fills at its first fsync
            disk_full_at(monkeypatch, 1, error_number)
        real(path, *rest, **options)

    monkeypatch.setattr(pipeline.finetune, "save_checkpoint", second_full)
    out = tmp_path / "m.pt"
    stopped = run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt", "--epochs", "2",
                     "--batch-size", "4", "--workers", "0", "--quiet", "--out", out)
    last = tmp_path / "m.last.ckpt"
    assert_one_line_error(stopped, room.format(path=last) + " run the command again with --resume (tl run resumes by "
                          "itself): it goes on from the checkpoint m.last.ckpt")
    assert stopped.err.endswith("; or write to another file system (an --out there starts over)\n") == (
        error_number == errno.EFBIG), stopped.err
    monkeypatch.undo()
    resumed = run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt", "--epochs", "2",
                     "--batch-size", "4", "--workers", "0", "--quiet", "--out", out, "--resume")
    assert resumed.code == 0 and "after epoch 1" in resumed.out + resumed.err, resumed


def test_full_disk_under_the_standard_output_is_one_line(tmp_path, small_head):
    """`tl predict > rows.csv` on a full disk (here a 20-byte file limit): one line and exit 2, whether the rows
    fail as they are written (unbuffered) or only when Python flushes what it buffered (a short output), not a
    traceback or Python's 'Exception ignored' and exit 120."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20, 20))

    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    for unbuffered in ({}, {"PYTHONUNBUFFERED": "1"}):
        with open(tmp_path / "rows.csv", "w") as rows:
            completed = subprocess.run([sys.executable, "-m", "cli", "predict", "--head", str(small_head / "head.pt"),
                                        "--workers", "0", str(small_head / "train" / "a")], cwd=REPO, stdout=rows,
                                       stderr=subprocess.PIPE, text=True, preexec_fn=limit,
                                       env={**environment, **unbuffered}, timeout=300)
        assert completed.returncode == 2, (unbuffered, completed.stderr)
        assert completed.stderr == ("error: the standard output is too large for its file system or the limit "
                                    "`ulimit -f`; raise the limit, then run the command again, or write to another "
                                    "file system instead\n"), unbuffered


@pytest.mark.parametrize("error_number, reason, room, elsewhere", [
    (errno.ENOSPC, "no space left on the device of {path}", "free space", ""),
    (errno.EFBIG, "{path} is too large for its file system or the limit `ulimit -f`", "raise the limit",
     "write to another file system"),
    (errno.EDQUOT, "the disk quota on the file system of {path} is used up", "free space within it", "")])
def test_a_file_size_limit_is_not_called_a_full_disk(run_tl, tmp_path, small_head, monkeypatch, error_number, reason,
                                                     room, elsewhere):
    """EFBIG (a file past `ulimit -f` or its file system's largest file) said 'no space left on the device ...;
    free space', which does not help: each errno has its own line, for a tl file, a cache's shard and a path a
    stage did not name (the CLI's last resort). EFBIG's other file system said 'raise the limit or write to
    another file system and re-run the same command' (the same command names the same path), and to a cache,
    which resumes only where its shards are, '... to resume': it is its own remedy, and where a run resumes
    the start over it is (a new --out)."""
    import cli
    import pipeline.files
    from cache import writer
    from tests.conftest import disk_full_at

    def line(path, then, resumes=False):
        other = f"{'; or' if resumes else ', or'} {elsewhere} {'(an --out there starts over)' if resumes else 'instead'}"
        return f"{reason.format(path=path)}; {room}{then}" + (other if elsewhere else "")

    disk_full_at(monkeypatch, 1, error_number)
    head = run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / "h.pt")
    assert_one_line_error(head, line(tmp_path / "h.pt", " and re-run the same command"))
    assert head.err.endswith(line(tmp_path / "h.pt", " and re-run the same command") + "\n")
    monkeypatch.undo()

    def second_shard_full(path, *args, **options):
        if Path(path).name == "shard-00001.h5":
            disk_full_at(monkeypatch, 1, error_number)
        return pipeline.files.write_bytes(path, *args, **options)

    monkeypatch.setattr(writer, "write_bytes", second_shard_full)
    with pytest.raises(pipeline.files.DiskFullError) as full:
        write_code_cache(tmp_path / "c", *blobs(n=6, width=4), ("a", "b", "c", "d"), shard_rows=3)
    assert str(full.value) == line(tmp_path / "c" / "shard-00001.h5", " and re-run the same command to resume",
                                   True).replace("; ", " (1 shard kept); ", 1)
    monkeypatch.undo()

    def refused(argv):
        raise OSError(error_number, os.strerror(error_number), str(tmp_path / "x"))

    monkeypatch.setattr(cli, "_invoke", refused)
    last_resort = run_tl("info", tmp_path)
    from pipeline.stops import RESUME_HINT

    resumes = line(tmp_path / "x", f", then {RESUME_HINT}", True)
    assert last_resort.code == 2 and last_resort.err == f"error: {resumes}\n", last_resort


# ------------------------------------------------------------------ outputs that are inputs


def test_no_command_writes_over_its_own_input(run_tl, tmp_path, small_head):
    head = tmp_path / "h.pt"
    head.write_bytes((small_head / "head.pt").read_bytes())
    model = tmp_path / "m.pt"
    assert run_tl("finetune", "--data", small_head / "train", "--head", head, "--out", model, "--epochs", "0",
                  "--workers", "0", "--quiet").code == 0
    before = {path: file_digest(path) for path in (head, model)}
    cache, images = small_head / "cache", small_head / "train"
    manifest = (cache / "manifest.json").read_bytes()
    cases = [
        (["export", "--model", model, "--format", "torchscript", "--out", model], "--out", "the same file as --model"),
        (["finetune", "--data", images, "--head", head, "--out", head, "--epochs", "0", "--workers", "0"], "--out",
         "the same file as --head"),
        (["evaluate", "--head", head, "--cache", cache, "--out", tmp_path / "r", "--save-predictions", head],
         "--save-predictions", "the same file as --head"),
    ]
    # an input folder is named as a folder: '--out C is the same file as --cache' said of a cache folder
    folders = [(["evaluate", "--head", head, "--cache", cache, "--out", cache], "--out", "--cache"),
               (["evaluate", "--head", head, "--cache", cache, "--out", tmp_path / "r", "--save-predictions", cache],
                "--save-predictions", "--cache"),
               (["sweep", "--cache", cache, "--out", cache], "--out", "--cache"),
               (["fit-head", "--cache", cache, "--out", cache], "--out", "--cache"),
               (["extract", "--data", images, "--out", images, *FAST], "--out", "--data")]
    cases += [(args, flag, f"is the {source} folder; writing there would change the input")
              for args, flag, source in folders]
    for args, flag, what in cases:
        assert_one_line_error(run_tl(*args), f"{flag} ", what, f"choose another {flag}")
    assert {path: file_digest(path) for path in (head, model)} == before
    assert (cache / "manifest.json").read_bytes() == manifest and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ edited manifests, flipped bits


def test_edited_manifests_are_refused(run_tl, tmp_path):
    codes = np.random.default_rng(0).normal(size=(40, 8))
    targets = np.arange(40) % 4
    edits = {
        "no key": lambda m: m.pop("key"),
        "rows lowered": lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] - 3),
        "classes trimmed": lambda m: m.update(classes=m["classes"][:2]),
        "rows not a number": lambda m: m["shards"][0].update(rows="10"),
        "a shard listed twice": lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])),
        "a class named twice": lambda m: m.update(classes=["a", "a", "c", "d"]),
        "fewer samples": lambda m: m.update(num_samples=38),
    }
    for name, edit in edits.items():
        cache = write_code_cache(tmp_path / name.replace(" ", "-"), codes, targets, list("abcd"), shard_rows=16)
        manifest = manifest_of(cache)
        edit(manifest)
        write_cache_document(cache, manifest)
        result = run_tl("fit-head", "--cache", cache, "--out", tmp_path / "h.pt")
        assert_one_line_error(result, str(cache), "--overwrite")
        assert not (tmp_path / "h.pt").exists()


def test_a_bit_flipped_shard_is_redone_not_reused(run_tl, tmp_path, image_folder):
    args = ["--data", image_folder, "--shard-rows", "5", "--workers", "0", *FAST]
    cache = tmp_path / "c"
    assert run_tl("extract", "--out", cache, *args).code == 0
    codes = CacheReader(cache).load("fc7")
    shard = cache / "shard-00001.h5"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x01  # same size, one bit changed
    shard.write_bytes(bytes(raw))
    again = run_tl("extract", "--out", cache, *args)
    assert again.code == 0 and "1 shard new, 2 reused" in again.out, again
    np.testing.assert_array_equal(CacheReader(cache).load("fc7"), codes)


def test_a_bit_flipped_checkpoint_is_not_resumed(run_tl, tmp_path, small_head):
    common = ["--data", small_head / "train", "--head", small_head / "head.pt", "--out", tmp_path / "m.pt",
              "--batch-size", "4", "--workers", "0", "--quiet"]
    assert run_tl("finetune", *common, "--epochs", "1").code == 0
    checkpoint = tmp_path / "m.last.ckpt"
    payload = torch.load(checkpoint, weights_only=True)
    tensor = next(t for t in payload["model"].values() if t.is_floating_point() and t.numel())
    tensor.view(-1).view(torch.int32)[0] ^= 1  # one bit of one weight
    torch.save(payload, checkpoint)  # a valid file with its old checksum: the content no longer matches it
    result = run_tl("finetune", *common, "--epochs", "2", "--resume")
    assert_one_line_error(result, "checkpoint", "checksum does not match")


def test_foreign_manifest_is_never_offered_to_overwrite(run_tl, tmp_path, image_folder):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app", "version": 3}')
    for extra in ([], ["--overwrite"]):
        result = run_tl("extract", "--data", image_folder, "--out", out, "--workers", "0", *FAST, *extra)
        assert_one_line_error(result, "not a tl cache's manifest", "choose another --out")
        assert "--overwrite" not in result.err
    assert (out / "manifest.json").read_text() == '{"name": "my web app", "version": 3}'


# ------------------------------------------------------------------ leftovers


def test_stale_temporaries_of_dead_runs_are_removed(run_tl, tmp_path, small_head):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [tmp_path / f".m.last.ckpt.tmp-{dead}", tmp_path / f".m.pt.tmp-{dead}", tmp_path / f".h.pt.tmp-{dead}"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    assert run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt",
                  "--out", tmp_path / "m.pt", "--epochs", "0", "--workers", "0", "--quiet").code == 0
    assert run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / "h.pt").code == 0
    assert leftovers(tmp_path) == []


def test_temporaries_of_another_host_are_left_to_it(tmp_path):
    """Under torchrun across nodes sharing a file system, a pid says nothing about a process of another host:
    a rank writing its tar listings there was judged dead here and its temporary removed mid-write. A
    temporary names its host; only this host's (and an earlier tl's, which named none) are judged here."""
    from pipeline.files import HOST, remove_stale_temporaries, temporary_name

    dead = 2 ** 22 + 12345  # above the default pid_max: no such process here
    other_host = "0000beef" if HOST != "0000beef" else "0000cafe"
    ours, earlier, theirs = (tmp_path / f".a.json.tmp-{dead}-{HOST}", tmp_path / f".b.json.tmp-{dead}",
                             tmp_path / f".c.json.tmp-{dead}-{other_host}")
    for path in (ours, earlier, theirs):
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([ours, earlier])
    assert theirs.exists()
    assert temporary_name(tmp_path / "d.json").name == f".d.json.tmp-{os.getpid()}-{HOST}"


def test_out_folder_for_a_file_is_refused_before_any_work(run_tl, tmp_path, small_head):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_one_line_error(run_tl("fit-head", "--cache", small_head / "cache", "--out", folder), "is a folder")
    assert_one_line_error(run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt",
                                 "--out", folder, "--epochs", "0"), "is a folder")
    assert_one_line_error(run_tl("export", "--model", small_head / "model.pt", "--format", "torchscript",
                                 "--out", folder), "is a folder")
    assert_one_line_error(run_tl("evaluate", "--head", folder, "--cache", small_head / "cache",
                                 "--out", tmp_path / "r"), "is a folder")
    assert list(folder.iterdir()) == []


# ------------------------------------------------------------------ unreadable images in finetune


def test_unreadable_images_in_finetune_are_skipped_counted_and_recorded(run_tl, tmp_path, small_head):
    train, val = tmp_path / "train", tmp_path / "val"
    make_image_folder(train, classes=("a", "b"), per_class=6)
    make_image_folder(val, classes=("a", "b"), per_class=3)
    (train / "a" / "broken.png").write_bytes(b"not an image")
    (val / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_tl("finetune", "--data", train, "--head", small_head / "head.pt", "--out", tmp_path / "m.pt",
                    "--val-data", val, "--epochs", "2", "--early-stop", "--batch-size", "4", "--workers", "0",
                    "--quiet")  # said on stderr even so, as extract and evaluate say theirs
    assert result.code == 0, result
    assert "warning: 1 training and 1 validation images could not be read" in result.err
    assert result.out.splitlines()[-1].endswith(", skipped images 1")  # not the history's key, skipped_images
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    history = json.loads(payload["metadata"])["history"]
    assert [point["skipped_images"] for point in history] == [1, 1]
    assert [point["val_skipped_images"] for point in history] == [1, 1]
    assert all(np.isfinite(point["val_loss"]) and np.isfinite(point["train_loss"]) for point in history)
    assert "kept epoch" in result.out  # a finite validation loss lets early stopping keep a best epoch
    # the readable six validation images only: a NaN row no longer counts as a class-0 prediction
    evaluation = run_tl("evaluate", "--model", tmp_path / "m.pt", "--data", val, "--split", "", "--out",
                        tmp_path / "r", "--workers", "0")
    assert evaluation.code == 0, evaluation
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rows"] == 6 and report["source"]["unreadable"] == 1
    assert evaluation.err.startswith("warning: skipped 1 image that could not be read or labelled (listed in "
                                     "report.json's source.skipped), e.g. b/broken.png: ") \
        and evaluation.err.count("\n") == 1, evaluation
    assert [item["sample_id"] for item in report["source"]["skipped"]] == ["b/broken.png"]
    assert "(1 image left out (unreadable or unlabelled))" in (tmp_path / "r" / "report.md").read_text()


# ------------------------------------------------------------------ bad settings and misleading messages


def test_bad_settings_are_one_line_each(run_tl, tmp_path, image_folder, voc_shapes, small_head):
    config = tmp_path / "bad.yaml"
    cases = []
    config.write_text("data:\nout: x\n")
    cases.append((["extract", "--config", config], "'data' has no value"))
    other = tmp_path / "map.yaml"
    other.write_text("data: {a: 1}\nout: x\n")
    cases.append((["extract", "--config", other], "'data' has a dict"))
    listed = tmp_path / "listed.yaml"  # a list is taken ([fc7]), so an empty item of one is what is said
    listed.write_text("layers: [fc7, null]\nout: x\n")
    cases.append((["extract", "--config", listed], "'layers' has no value as item 2 of its list; give every item a "
                  "value, as on the command line (--layers A,B)"))
    listed = tmp_path / "nested.yaml"
    listed.write_text("layers: [fc7, [fc6]]\nout: x\n")
    cases.append((["extract", "--config", listed], "'layers' has a list as item 2 of its list"))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data: caf\xe9\n".encode("latin-1"))
    cases.append((["extract", "--config", latin], "not UTF-8"))
    cases.append((["extract", "--data", image_folder, "--out", tmp_path / "c", "--workers", "-1", *FAST],
                  "'--workers': -1 is not in the range x>=0"))
    for scales in ("inf", "nan", "0", "-2", "1,1e9"):
        cases.append((["extract", "--format", "voc", "--data", voc_shapes, "--classes", "auto", "--multiscale", "--scales", scales,
                       "--out", tmp_path / "v", *FAST], "--scales must be numbers from 1.0"))
    cases.append((["quickstart", "--out", tmp_path / "q", "--per-class", "1"], "at least 8"))
    cases.append((["quickstart", "--out", tmp_path / "q", "--per-class", "5"], "at least 8"))
    cases.append((["predict", image_folder, "--head", small_head / "head.pt", "--weights", small_head / "head.pt"],
                  "drop --weights"))
    cases.append((["finetune", "--data", image_folder, "--head", small_head / "head.pt", "--val-data",
                   tmp_path / "nowhere", "--out", tmp_path / "m.pt"], "--val-data " + str(tmp_path / "nowhere")))
    cases.append((["run", tmp_path], f"config file {tmp_path} is a folder; pass the YAML file in it"))
    cases.append((["export", "--model", tmp_path / "m.pt", "--out", tmp_path / "x.ts"],
                  "Missing option '--format'. Choose from: torchscript, onnx (see tl export --help)"))
    for args, fragment in cases:
        assert_one_line_error(run_tl(*args), fragment)
    assert not (tmp_path / "q").exists() and not (tmp_path / "v").exists()


def test_weights_that_are_not_a_state_dict_never_suggest_unsafe_loading(run_tl, tmp_path, image_folder):
    import argparse

    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "w.pt")  # loads only with weights_only=False
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", "--backbone", "alexnet",
                    "--weights", tmp_path / "w.pt", "--quiet", "--workers", "0")
    assert_one_line_error(result, "could run code", "state_dict")
    assert "weights_only" not in result.err
    folder_result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", "--backbone", "alexnet",
                           "--weights", tmp_path, "--quiet", "--workers", "0")
    assert_one_line_error(folder_result, "is a folder")


def test_an_efficientnet_cache_names_the_backbone_not_a_layer(run_tl, tmp_path, image_folder, small_head):
    cache = tmp_path / "eff"
    assert run_tl("extract", "--data", image_folder, "--out", cache, "--backbone", "efficientnet_lite0",
                  "--weights", "none", "--quiet", "--workers", "0").code == 0
    result = run_tl("evaluate", "--head", small_head / "head.pt", "--cache", cache, "--out", tmp_path / "r")
    assert_one_line_error(result, "backbone: alexnet -> efficientnet_lite0")
    assert "--layers" not in result.err


def test_non_utf8_names_are_kept_through_cache_and_predictions(run_tl, tmp_path):
    root = tmp_path / "images"
    make_image_folder(root, classes=("a", "b"), per_class=2)
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8, surrogate-escaped by Python
    write_image(root / "a" / odd, seed=9)
    cache = tmp_path / "c"
    assert run_tl("extract", "--data", root, "--out", cache, "--workers", "0", *FAST).code == 0
    ids = list(CacheReader(cache).load_column("sample_id"))
    assert os.fsdecode(b"a/caf\xe9.png") in ids
    assert run_tl("fit-head", "--cache", cache, "--out", tmp_path / "h.pt").code == 0
    result = run_tl("evaluate", "--head", tmp_path / "h.pt", "--cache", cache, "--out", tmp_path / "r",
                    "--save-predictions", tmp_path / "p.csv")
    assert result.code == 0, result
    assert b"a/caf\xe9.png" in (tmp_path / "p.csv").read_bytes()


def test_second_campaign_outputs_never_land_on_inputs(run_tl, tmp_path, small_head):
    """Found by the second fault campaign: outputs inside an input folder, over the report, or a folder."""
    cache, head = small_head / "cache", small_head / "head.pt"
    manifest_before = (cache / "manifest.json").read_bytes()
    report = tmp_path / "r"
    cases = [
        (["evaluate", "--head", head, "--cache", cache, "--out", report, "--save-predictions",
          cache / "manifest.json"], "lies inside --cache"),
        (["evaluate", "--head", head, "--cache", cache, "--out", report, "--save-predictions",
          report / "report.json"], "same file as --out's report.json"),
        (["evaluate", "--head", head, "--cache", cache, "--out", report, "--save-predictions", tmp_path],
         "is a folder"),
        (["extract", "--data", small_head / "train", "--out", small_head / "train" / "a" / "c", *FAST],
         "lies inside --data"),
        # sweep refused an --out in the cache (extract --overwrite sweeps it away); fit-head wrote its head there
        (["fit-head", "--cache", cache, "--out", cache / "h.pt"], "lies inside --cache"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_tl(*args), fragment)
    assert (cache / "manifest.json").read_bytes() == manifest_before
    assert not report.exists() and not (small_head / "train" / "a" / "c").exists() and not (cache / "h.pt").exists()


def test_a_symlink_to_a_running_finetunes_out_takes_its_lock(run_tl, tmp_path, small_head):
    (tmp_path / "m.pt").write_bytes(b"")
    (tmp_path / "link.pt").symlink_to(tmp_path / "m.pt")
    with lock_held_elsewhere(tmp_path / ".m.pt.lock"):
        result = run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt",
                        "--out", tmp_path / "link.pt", "--epochs", "0", "--workers", "0", "--quiet")
        assert_one_line_error(result, "is training into")
    assert (tmp_path / "link.pt").is_symlink()  # later runs write through the link, never replace it


def test_second_campaign_settings_and_messages(run_tl, tmp_path, small_head, image_folder, voc_shapes):
    floats = tmp_path / "float.yaml"
    floats.write_text("shard_rows: 1.5\n")
    flag = tmp_path / "bool.yaml"
    flag.write_text("workers: true\n")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    cases = [
        (["extract", "--config", floats, "--data", image_folder, "--out", tmp_path / "c", *FAST], "1.5"),
        (["extract", "--config", flag, "--data", image_folder, "--out", tmp_path / "c", *FAST], "not true"),
        (["extract", "--data", image_folder, "--out", tmp_path / "c", "--batch-size", "x", *FAST], "'x'"),
        (["finetune", "--data", small_head / "train", "--head", small_head / "head.pt", "--out", tmp_path / "m.pt",
          "--epochs", "0", "--workers", "-1"], "'--workers': -1 is not in the range x>=0"),
        (["extract", "--data", image_folder, "--out", tmp_path / "c", "--backbone", "alexnet", "--weights",
          tmp_path / "noise.pt", "--workers", "0", "--quiet"], "not a file written by torch.save"),
        (["extract", "--format", "voc", "--data", voc_shapes, "--classes", "auto", "--multiscale", "--scales",
          "1,1,1", "--out", tmp_path / "v", *FAST], "lists a scale twice"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_tl(*args), fragment)
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "v").exists()


def test_review_findings_are_one_line_each(run_tl, tmp_path, small_head, image_folder, monkeypatch):
    """Found in review: an --out whose folder cannot be made, a bad TL_WORKER_TIMEOUT, a checkpoint from
    before checksums."""
    (tmp_path / "file").write_text("x")
    args = ["finetune", "--data", small_head / "train", "--head", small_head / "head.pt", "--workers", "0",
            "--quiet", "--batch-size", "4"]
    # a file where a folder of --out should be is named (it was 'cannot create FILE/.m.pt.lock: File exists')
    assert_one_line_error(run_tl(*args, "--out", tmp_path / "file" / "m.pt", "--epochs", "0"),
                          f"cannot write model file {tmp_path / 'file' / 'm.pt'}: {tmp_path / 'file'} is a file, not a "
                          "folder; choose another path")
    monkeypatch.setenv("TL_WORKER_TIMEOUT", "abc")
    assert_one_line_error(run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", "--workers", "1", *FAST),
                          "TL_WORKER_TIMEOUT must be a number")
    monkeypatch.delenv("TL_WORKER_TIMEOUT")
    assert run_tl(*args, "--out", tmp_path / "m.pt", "--epochs", "1").code == 0
    payload = torch.load(tmp_path / "m.last.ckpt", weights_only=True)
    payload.pop("sha256")
    torch.save(payload, tmp_path / "m.last.ckpt")  # as tl wrote checkpoints before checksums
    assert_one_line_error(run_tl(*args, "--out", tmp_path / "m.pt", "--epochs", "2", "--resume"),
                          "without content checksums", "delete it and start over")


def test_bare_tl_shows_the_help(run_tl):
    result = run_tl()
    assert "Usage: tl" in (result.out + result.err) and "Traceback" not in result.err


def test_info_verify_checks_targets_against_the_classes(run_tl, tmp_path):
    cache = write_code_cache(tmp_path / "c", np.ones((8, 2)), np.arange(8) % 4, list("abcd"), shard_rows=8)
    manifest = manifest_of(cache)
    manifest["classes"] = ["a", "b"]
    write_cache_document(cache, manifest)
    result = run_tl("info", cache, "--verify")
    assert result.code == 2 and "has class 3 but the manifest names 2 classes" in result.err


def test_a_multi_label_manifest_with_trimmed_classes_is_refused(run_tl, tmp_path):
    targets = (np.arange(24)[:, None] % np.array([2, 3, 4]) == 0).astype(np.int64)
    cache = write_code_cache(tmp_path / "c", np.ones((24, 2)), targets, list("abc"), shard_rows=24)
    manifest = manifest_of(cache)
    manifest["classes"] = ["a", "b"]
    write_cache_document(cache, manifest)
    assert_one_line_error(run_tl("fit-head", "--cache", cache, "--out", tmp_path / "h.pt"),
                          "targets of (3,) classes but the manifest names 2")
    assert "targets of (3,) classes" in run_tl("info", cache, "--verify").err


def test_predict_prints_non_utf8_names_as_their_bytes(tmp_path, small_head):
    folder = tmp_path / "pics"
    write_image(folder / os.fsdecode(b"caf\xe9.png"), seed=3)
    completed = subprocess.run([sys.executable, "-m", "cli", "predict", "--head", str(small_head / "head.pt"),
                                "--workers", "0", str(folder)], cwd=REPO, capture_output=True,
                               env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"})
    assert completed.returncode == 0, completed.stderr
    assert b"caf\xe9.png" in completed.stdout and b"Traceback" not in completed.stderr


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def small_head(tmp_path_factory):
    """A seeded random AlexNet's pool5 cache of two classes, a logreg head and a finetuned model file."""
    from cli import main

    root = tmp_path_factory.mktemp("faults")
    make_image_folder(root / "train", classes=("a", "b"), per_class=6)
    common = ["--backbone", "alexnet", "--weights", "none", "--workers", "0", "--quiet"]
    for args in (["extract", "--data", root / "train", "--out", root / "cache", "--layers", "pool5", *common],
                 ["fit-head", "--cache", root / "cache", "--out", root / "head.pt"],
                 ["finetune", "--data", root / "train", "--head", root / "head.pt", "--out", root / "model.pt",
                  "--epochs", "0", "--workers", "0", "--quiet"]):
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in args])
        assert done.value.code == 0
    return root


@pytest.fixture(scope="module")
def voc_shapes(tmp_path_factory):
    from pipeline.examples import write_shapes_voc

    return write_shapes_voc(tmp_path_factory.mktemp("voc"), {"trainval": 4, "test": 3})


def thread_stderr(target, capsys) -> str:
    """What `target`, run in a thread of its own, printed to stderr (its error reports)."""
    import threading

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return capsys.readouterr().err


def test_helper_threads_stay_silent_once_a_stop_has_begun(capsys, monkeypatch):
    """multiprocessing's fd-sharing thread can fail mid-handshake while SIGTERM takes the DataLoader
    workers down; its traceback must not follow the stop's one line, but any other thread's failure
    is still reported."""
    import threading

    from pipeline import stops

    monkeypatch.setattr(stops, "STOPPING", threading.Event())
    monkeypatch.setattr(threading, "excepthook", stops.thread_excepthook)
    monkeypatch.setattr(sys, "excepthook", stops.process_excepthook)

    def fail():
        raise ConnectionResetError("peer gone")

    def serve():  # how multiprocessing.resource_sharer reports: through sys.excepthook itself
        try:
            fail()
        except ConnectionResetError:
            sys.excepthook(*sys.exc_info())

    def run_thread(target):
        return thread_stderr(target, capsys)

    assert "ConnectionResetError: peer gone" in run_thread(fail)
    assert "ConnectionResetError: peer gone" in run_thread(serve)
    with pytest.raises(stops.Terminated):
        stops.terminated(15, None)
    assert run_thread(fail) == ""
    assert run_thread(serve) == ""


def test_a_workers_fd_sharer_that_loses_the_tl_process_stays_silent(capsys, monkeypatch):
    """A DataLoader worker (forked: it inherits the hooks, not the stop) runs multiprocessing's fd-sharing
    server; when SIGTERM takes the tl process down, that server's accept fails and it reports through
    sys.excepthook after the stop's one line (seen in CI). In a forked process that report is silent;
    in the tl process, and from any other code, errors are still shown."""
    import os
    import threading

    from pipeline import stops

    monkeypatch.setattr(stops, "STOPPING", threading.Event())
    monkeypatch.setattr(sys, "excepthook", stops.process_excepthook)
    sharer = os.path.join(os.sep, "lib", "multiprocessing", "resource_sharer.py")
    namespace: dict = {"sys": sys}
    exec(compile("def _serve():\n    try:\n        raise ConnectionResetError('peer gone')\n"
                 "    except OSError:\n        sys.excepthook(*sys.exc_info())\n", sharer, "exec"), namespace)

    def elsewhere():
        try:
            raise ConnectionResetError("peer gone")
        except OSError:
            sys.excepthook(*sys.exc_info())

    def report(target):
        return thread_stderr(target, capsys)

    monkeypatch.setattr(stops, "MAIN_PID", os.getpid())  # the tl process itself: shown
    assert "ConnectionResetError: peer gone" in report(namespace["_serve"])
    monkeypatch.setattr(stops, "MAIN_PID", os.getpid() + 1)  # a process forked from it: silent
    assert report(namespace["_serve"]) == ""
    # the tl process gone between the sharer's accept and its recv: EOFError (seen under a loaded machine)
    exec(compile("def _serve():\n    try:\n        raise EOFError\n"
                 "    except EOFError:\n        sys.excepthook(*sys.exc_info())\n", sharer, "exec"), namespace)
    assert report(namespace["_serve"]) == ""
    monkeypatch.setattr(stops, "MAIN_PID", os.getpid())
    assert "EOFError" in report(namespace["_serve"])
    assert "ConnectionResetError: peer gone" in report(elsewhere)


def test_a_stop_that_lands_in_a_finalizer_is_delivered_again(monkeypatch):
    """SIGTERM raised while Python runs a `__del__` (or a weakref callback) would be printed as "Exception
    ignored" and lost; the CLI's hook raises the signal again, so Terminated reaches the main flow."""
    from pipeline import stops

    monkeypatch.setattr(stops, "STOPPING", __import__("threading").Event())
    monkeypatch.setattr(sys, "unraisablehook", stops.unraisable)
    previous = signal.signal(signal.SIGTERM, stops.terminated)
    try:
        class Finalized:
            def __del__(self):
                raise stops.Terminated()

        with pytest.raises(stops.Terminated):
            Finalized()  # dropped at once: __del__ runs, its exception is unraisable
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the signal comes again from a helper thread
                time.sleep(0.001)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_workers_death_reported_inside_a_finalizer_stops_the_loader(monkeypatch, capsys):
    """torch's SIGCHLD handler raises a decoding worker's death wherever the main thread is: inside a `__del__`
    it was printed as "Exception ignored ... RuntimeError: DataLoader worker (pid N) is killed by signal:
    Killed." and the run went on (a traceback after which the extract could still end 0, seen once with the
    suite on both cores). The hook keeps it unprinted for the loader, which raises the death's one line at
    its next batch, or at its end; another finalizer's error is still Python's report."""
    from pipeline import stops
    from pipeline.errors import TLError
    from pipeline.hardware import WorkerLoader

    monkeypatch.setattr(stops, "STOPPING", __import__("threading").Event())
    monkeypatch.setattr(stops, "MAIN_PID", os.getpid())
    monkeypatch.setattr(stops, "LOST_WORKERS", [])
    monkeypatch.setattr(sys, "unraisablehook", stops.unraisable)

    class Finalized:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    for batches in (range(3), range(0)):  # the death lands while batches remain, or after the last
        Finalized(RuntimeError("DataLoader worker (pid 5) is killed by signal: Killed. "))
        assert capsys.readouterr().err == "" and len(stops.LOST_WORKERS) == 1
        with pytest.raises(TLError, match="^a decoding worker was killed by signal Killed "):
            list(WorkerLoader(list(batches), torch.device("cpu"), 0, batch_size=1))
        assert stops.LOST_WORKERS == []
    Finalized(RuntimeError("something else"))
    assert "RuntimeError: something else" in capsys.readouterr().err and stops.LOST_WORKERS == []


def test_a_full_disk_when_taking_the_lock_is_one_line(tmp_path):
    """On a disk already full, the first write of a re-run is the lock's pid: one line, not a traceback."""
    data = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2)
    run = tl_process("extract", "--data", data, "--out", tmp_path / "c", *FAST, file_limit=1)  # any pid is longer
    assert run.code == 2 and run.err.startswith(f"error: {tmp_path / 'c' / '.lock'} is too large for its file "
                                                "system or the limit `ulimit -f`; raise the limit"), run
    assert ".lock" in run.err and len(run.err.strip().splitlines()) == 1


def test_damaged_shard_records_are_rebuilt_by_the_same_extract(run_tl, tmp_path, image_folder):
    """A bad line in shards.jsonl (or junk in a rank's record file) stops readers with one line that says
    how to repair it; the same tl extract command rebuilds the records from the shard files' own
    attributes, keeps every intact shard and gives the cache of an unbroken run."""
    args = ["--data", image_folder, "--shard-rows", "5", "--workers", "0", *FAST]
    cache = tmp_path / "c"
    assert run_tl("extract", "--out", cache, *args).code == 0
    codes = CacheReader(cache).load("fc7")
    records = cache / "shards.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    (cache / "shards-rank3.jsonl").write_text("junk\njunk\n")
    refused = run_tl("info", cache, "--verify")
    assert_one_line_error(refused, "shards.jsonl line 2 is not a shard record", "re-run the same tl extract command")
    again = run_tl("extract", "--out", cache, *args)
    assert again.code == 0 and "0 shards new, 3 reused" in again.out, again
    np.testing.assert_array_equal(CacheReader(cache).load("fc7"), codes)
    assert not (cache / "shards-rank3.jsonl").exists() and len(records.read_text().splitlines()) == 3


def test_a_path_the_system_refuses_is_one_line(run_tl, tmp_path, small_head, image_folder):
    """A name longer than the file system allows fails in whatever call meets it first (an exists(), a
    mkdir): one line naming the path, whichever command."""
    long = tmp_path / ("a" * 300)
    assert_one_line_error(run_tl("extract", "--data", image_folder, "--out", long, *FAST), "File name too long",
                          "choose another path")
    assert_one_line_error(run_tl("finetune", "--data", small_head / "train", "--head", small_head / "head.pt",
                                 "--out", f"{long}.pt", "--epochs", "0", "--quiet"), "File name too long")
    assert_one_line_error(run_tl("predict", "--head", small_head / "head.pt", long), "File name too long")
    # a folder of the path is a file: the message names it ("File exists" named nothing), before the training
    import pipeline.fit_head

    (tmp_path / "plain").write_text("a file")
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(pipeline.fit_head, "training_rows", lambda *args: pytest.fail("the training began"))
        result = run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / "plain" / "sub" / "h.pt",
                        "--quiet")
    assert_one_line_error(result, f"{tmp_path / 'plain'} is a file, not a folder; choose another path")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere" / "dir")
    result = run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / "gone" / "h.pt", "--quiet")
    assert_one_line_error(result, f"{tmp_path / 'gone'} is a link to nothing, not a folder; choose another path")


def test_a_head_file_that_cannot_be_written_is_refused_before_the_training(run_tl, tmp_path, small_head, monkeypatch):
    """A head out on a read-only file system (or in a folder the user may not write) was found only when the
    trained head was saved: minutes of training, then 'cannot write head file'. It is now refused first, as a
    folder that is a file is; a folder still to be made is probed in the nearest one that exists."""
    import errno

    import pipeline.fit_head

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if str(path).startswith(str(read_only)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    monkeypatch.setattr(pipeline.fit_head, "training_rows", lambda *args: pytest.fail("the training began"))
    for out in (read_only / "h.pt", read_only / "new" / "h.pt"):
        result = run_tl("fit-head", "--cache", small_head / "cache", "--out", out, "--quiet")
        assert_one_line_error(result, f"cannot write head file {out}: Read-only file system; choose another path")
    assert list(read_only.iterdir()) == []
    monkeypatch.undo()
    written = run_tl("fit-head", "--cache", small_head / "cache", "--out", tmp_path / "writable" / "h.pt", "--quiet")
    assert written.code == 0 and sorted(p.name for p in (tmp_path / "writable").iterdir()) == ["h.pt"], written


def test_a_head_given_as_a_model_and_an_empty_path_say_what_to_do(run_tl, tmp_path, small_head, monkeypatch):
    """A head file passed to export said 'not a tl-model/1 file; train one with tl finetune'; an empty --out
    (a shell variable not set) wrote a report into the working folder."""
    head, model = small_head / "head.pt", small_head / "model.pt"
    assert_one_line_error(run_tl("export", "--model", head, "--format", "torchscript", "--out", tmp_path / "m.ts"),
                          f"{head} is a head file of tl fit-head, not a model file; make a model of it with tl "
                          f"finetune --head {head} (--epochs 0 keeps the head as it is)")
    assert_one_line_error(run_tl("evaluate", "--head", model, "--cache", small_head / "cache", "--out", tmp_path / "r"),
                          "is a model file of tl finetune, not a head file; evaluate, predict and export take it as --model")
    import pickle

    pickled = tmp_path / "p4.pt"
    pickled.write_bytes(pickle.dumps({"metadata": "{}"}, protocol=4))  # torch warned of its protocol in 2 lines more
    with warnings.catch_warnings(record=True) as caught:  # what a terminal would show above the error line
        warnings.simplefilter("always")
        refused = run_tl("evaluate", "--head", pickled, "--cache", small_head / "cache", "--out", tmp_path / "r")
    assert_one_line_error(refused, f"{pickled} is not a tl head file")
    assert not [str(warning.message) for warning in caught]
    with warnings.catch_warnings(record=True) as caught:  # the same file as --weights
        warnings.simplefilter("always")
        refused = run_tl("extract", "--data", small_head / "train", "--out", tmp_path / "c", "--backbone", "alexnet",
                         "--weights", pickled, "--workers", "0")
    assert_one_line_error(refused, f"cannot load weights from {pickled}")
    assert not [str(warning.message) for warning in caught]
    pickled.unlink()
    monkeypatch.chdir(tmp_path)
    empty = run_tl("evaluate", "--head", head, "--cache", small_head / "cache", "--out", "")
    assert_one_line_error(empty, "Invalid value for '--out': is empty; name a path")
    assert not list(tmp_path.iterdir())


def test_links_planted_among_tls_own_files_are_replaced_never_written_through(run_tl, tmp_path, image_folder):
    """A cache, report or sweep folder handed over with a link where tl writes one of its own files (a shard,
    shards.jsonl, report.json, a sweep's head) never sends that write outside the folder."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    args = ["--data", image_folder, "--shard-rows", "5", "--workers", "0", *FAST]
    cache = tmp_path / "c"
    assert run_tl("extract", "--out", cache, *args).code == 0
    document = cache_document(cache)  # as a run killed before its last shard left it
    document["shards"], document["complete"] = document["shards"][:-1], False
    write_cache_document(cache, document)
    (cache / "shard-00002.h5").unlink()
    (cache / "shard-00002.h5").symlink_to(victim)
    again = run_tl("extract", "--out", cache, *args)
    assert again.code == 0 and "1 shard new, 2 reused" in again.out, again
    assert victim.read_text() == "precious" and not (cache / "shard-00002.h5").is_symlink()
    codes = write_code_cache(tmp_path / "codes", *blobs_of_three(), ["a", "b", "c"])
    sweep = tmp_path / "sweep"
    (sweep / "heads").mkdir(parents=True)
    for name in ("heads/feat-logreg-C1.pt", "heads/feat-logreg-C1.json", "best.pt", "sweep.json"):
        (sweep / name).symlink_to(victim)
    assert run_tl("sweep", "--cache", codes, "--C", "1", "--out", sweep, "--quiet").code == 0
    assert victim.read_text() == "precious"
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").symlink_to(victim)
    result = run_tl("evaluate", "--head", sweep / "best.pt", "--cache", codes, "--out", report)
    assert result.code == 0, result
    assert victim.read_text() == "precious" and json.loads((report / "report.json").read_text())["accuracy"] >= 0


def blobs_of_three():
    from tests.conftest import blobs

    return blobs(n=120, classes=3, width=8)


def test_a_cache_whose_layer_name_is_a_path_is_refused(run_tl, tmp_path):
    """A sweep names its head files after the cache's layers: a layer called ../../x in a cache handed
    over wrote (and with --keep best, deleted) heads outside --out."""
    codes = write_code_cache(tmp_path / "deep" / "er" / "codes", *blobs_of_three(), ["a", "b", "c"],
                             layer="../../../escaped")
    result = run_tl("sweep", "--cache", codes, "--C", "0.1,1", "--out", tmp_path / "deep" / "er" / "sweep", "--quiet")
    assert_one_line_error(result, "needs a plain name")
    assert not list(tmp_path.glob("escaped*")) and not list(tmp_path.rglob("escaped*"))
    assert_one_line_error(run_tl("info", codes), "needs a plain name")


@pytest.mark.parametrize("edit", [{"name": "../../victim"}, {"name": "feat-logreg-C0.1"}, {"val_score": "high"},
                                  {"train_seconds": None}])
def test_an_edited_sweep_record_is_trained_again_not_a_traceback(run_tl, tmp_path, edit):
    codes = write_code_cache(tmp_path / "codes", *blobs_of_three(), ["a", "b", "c"])
    sweep = tmp_path / "sweep"
    assert run_tl("sweep", "--cache", codes, "--C", "0.1,1", "--out", sweep, "--quiet").code == 0
    board = (sweep / "sweep.json").read_text()
    record = sweep / "heads" / "feat-logreg-C1.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), **edit}))
    again = run_tl("sweep", "--cache", codes, "--C", "0.1,1", "--out", sweep, "--quiet")
    assert again.code == 0 and "(1 trained, 1 finished before)" in again.out, again
    assert [row["name"] for row in json.loads((sweep / "sweep.json").read_text())["heads"]] == \
        [row["name"] for row in json.loads(board)["heads"]]


@pytest.mark.parametrize("damage", ["null", "[]", "\"x\""])
def test_a_damaged_record_of_a_dropped_head_is_trained_again_not_a_traceback(run_tl, tmp_path, damage):
    """With --keep best the other heads' files are gone and only their records stay: one that is not a JSON
    object (null, a list) ended the sweep in an AttributeError instead of being trained again."""
    codes = write_code_cache(tmp_path / "codes", *blobs_of_three(), ["a", "b", "c"])
    sweep = tmp_path / "sweep"
    args = ["sweep", "--cache", codes, "--C", "0.1,1", "--out", sweep, "--quiet", "--keep", "best"]
    assert run_tl(*args).code == 0
    dropped = [record for record in (sweep / "heads").glob("*.json") if not record.with_suffix(".pt").exists()]
    assert len(dropped) == 1
    dropped[0].write_text(damage)
    again = run_tl(*args)
    assert again.code == 0 and "(1 trained, 1 finished before)" in again.out, again


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_damaged_head_file_of_a_sweep_is_trained_again_not_reused(run_tl, tmp_path, damage):
    """A kept head file with a bit flipped or cut short was counted as finished (its record was whole) and,
    ranked first, copied to best.pt: the sweep said it wrote best.pt, which evaluate then refused as damaged,
    and every re-run reused it again. It is trained again, and best.pt is the head an unbroken sweep writes."""
    from pipeline.model_files import load_head

    codes = write_code_cache(tmp_path / "codes", *blobs_of_three(), ["a", "b", "c"])
    args = ["sweep", "--cache", codes, "--C", "0.1,1", "--quiet", "--keep", "all"]
    assert run_tl(*args, "--out", tmp_path / "straight").code == 0
    sweep = tmp_path / "sweep"
    assert run_tl(*args, "--out", sweep).code == 0
    best = json.loads((sweep / "sweep.json").read_text())["best"]
    head = sweep / "heads" / f"{best}.pt"
    content = bytearray(head.read_bytes())
    if damage == "flip":
        content[len(content) // 2] ^= 1
    else:
        del content[len(content) // 2:]
    head.write_bytes(bytes(content))
    again = run_tl(*args, "--out", sweep)
    assert again.code == 0 and "(1 trained, 1 finished before)" in again.out, again
    for name in ("best.pt", f"heads/{best}.pt"):
        load_head(sweep / name)  # whole again: its checksum matches
        assert (sweep / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_a_report_inside_the_evaluated_image_folder_is_refused(run_tl, tmp_path, small_head):
    """Its plots are PNG files: in a class folder they would be scored as that class next time, in a new
    folder they would make a class of their own."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_head / "train", data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data / "reports", data / "a"):
        refused = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "",
                         "--out", out, "--workers", "0", "--quiet")
        assert refused.code == 2 and refused.err.count("\n") == 1, refused
        assert f"--out {out} lies inside --data {data}" in refused.err and "choose another --out" in refused.err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    scored = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "", "--out",
                    tmp_path / "report", "--save-predictions", data / "predictions.csv", "--workers", "0", "--quiet")
    assert scored.code == 0 and (data / "predictions.csv").is_file(), scored  # not an image: the data stays as it was


def test_a_model_inside_the_image_folder_it_trains_on_is_refused(run_tl, tmp_path, small_head):
    """Its folder would become a class of the data (an empty one, then one of the next extract's classes)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_head / "train", data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    refused = run_tl("finetune", "--data", data, "--split", "", "--head", small_head / "head.pt", "--epochs", "0",
                     "--out", data / "models" / "m.pt", "--workers", "0", "--quiet")
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert f"--out {data / 'models' / 'm.pt'} lies inside --data {data}" in refused.err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_folder_where_tl_writes_one_of_its_own_files_says_to_move_it(run_tl, tmp_path, small_head):
    """The user names the report's folder, not report.json: 'name a report inside it' asked for what
    no flag can do."""
    out = tmp_path / "report"
    (out / "report.json").mkdir(parents=True)
    refused = run_tl("evaluate", "--head", small_head / "head.pt", "--cache", small_head / "cache", "--out", out)
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert f"{out / 'report.json'} is a folder, where tl writes a report; move it away" in refused.err
    assert "inside it" not in refused.err and (out / "report.json").is_dir()


def test_an_out_inside_a_linked_class_folder_of_the_data_is_refused(run_tl, tmp_path, small_head):
    """A class folder may be a link to images kept elsewhere (the walk of an imagefolder follows it): an --out
    under it, named through the data folder, lies in the data as much as one under a plain class folder."""
    import shutil

    data, kept = tmp_path / "data", tmp_path / "kept"
    shutil.copytree(small_head / "train", kept)
    data.mkdir()
    for folder in kept.iterdir():
        (data / folder.name).symlink_to(folder, target_is_directory=True)
    before = sorted(p.relative_to(kept) for p in kept.rglob("*"))
    out = data / "a" / "reports"
    refused = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "", "--out", out,
                     "--workers", "0", "--quiet")
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert f"--out {out} lies inside --data {data}" in refused.err
    refused = run_tl("finetune", "--data", data, "--split", "", "--head", small_head / "head.pt", "--epochs", "0",
                     "--out", data / "a" / "m.pt", "--workers", "0", "--quiet")
    assert refused.code == 2 and f"lies inside --data {data}" in refused.err, refused
    out = kept / "a" / "reports"  # named by where the class folder leads: the report's plots would be images of a
    refused = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "", "--out", out,
                     "--workers", "0", "--quiet")
    assert refused.code == 2 and refused.err == (
        f"error: --out {out} lies inside --data {data} (its folder a links there); writing there would change the "
        "input: choose another --out\n"), refused
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == before


def test_an_out_where_a_linked_class_folder_of_a_split_leads_is_refused(run_tl, tmp_path, small_head):
    """The class folders of data with split folders lie in DATA/SPLIT (the digits recipe's layout): an --out
    named by where one of them links (data/test/a -> kept/a) was written, the report's plots becoming images of
    class a; it is refused as one where a class folder of DATA leads. A link to a file, a hidden folder (no class)
    and an --out beside the data are not refused."""
    import shutil

    data, kept = tmp_path / "data", tmp_path / "kept"
    shutil.copytree(small_head / "train", kept)
    (data / "test").mkdir(parents=True)
    for folder in kept.iterdir():
        (data / "test" / folder.name).symlink_to(folder, target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (data / "test" / ".hidden").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (data / "notes.txt").symlink_to(tmp_path / "notes.txt")
    before = sorted(p.relative_to(kept) for p in kept.rglob("*"))
    out = kept / "a" / "reports"
    refused = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "test", "--out", out,
                     "--workers", "0", "--quiet")
    assert refused.code == 2 and refused.err == (
        f"error: --out {out} lies inside --data {data} (its folder test/a links there); writing there would change "
        "the input: choose another --out\n"), refused
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == before
    for out in (tmp_path / "elsewhere" / "reports", tmp_path / "reports"):
        written = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "test", "--out",
                         out, "--workers", "0", "--quiet")
        assert written.code == 0 and (out / "report.json").is_file(), written


def test_an_out_through_a_linked_class_folder_and_up_out_of_it_is_not_refused(run_tl, tmp_path, small_head):
    """--out D/a/../reports, with D/a a link to kept/a, names kept/reports (the system takes the `..` from
    where the link leads), outside D: it was refused as 'lies inside --data D' (the path as named had its `..`
    taken from D/a, lexically), though nothing is written in D."""
    import shutil

    data, kept = tmp_path / "data", tmp_path / "kept"
    shutil.copytree(small_head / "train", kept)
    data.mkdir()
    for folder in kept.iterdir():
        (data / folder.name).symlink_to(folder, target_is_directory=True)
    done = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "",
                  "--out", data / "a" / ".." / "reports", "--workers", "0", "--quiet")
    assert done.code == 0, done
    assert (kept / "reports" / "report.json").is_file() and not (data / "reports").exists()
    refused = run_tl("evaluate", "--model", small_head / "model.pt", "--data", data, "--split", "",
                     "--out", data / "a" / ".." / ".." / "data" / "b" / "reports", "--workers", "0", "--quiet")
    assert refused.code == 2 and "lies inside --data" in refused.err, refused  # kept/../data/b: in D again
