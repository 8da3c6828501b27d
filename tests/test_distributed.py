"""tl under torchrun on the CPU (gloo, 2 processes): the cache equals a single process's, resumes with
another world size, and survives a rank that dies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache.reader import CacheReader
from tests.conftest import REPO, cache_document, make_image_folder

EXTRACT = ["extract", "--backbone", "alexnet", "--weights", "none", "--layers", "pool5", "--dtype", "float32",
           "--shard-rows", "3", "--workers", "0", "--quiet"]


def torchrun(*args, processes=2, **environment):
    """`torchrun --nproc_per_node N -m cli ARGS` on free local ports, with the variables `environment` added
    (a PYTHONPATH goes before tl's checkout); returns the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "cli", *map(str, args)]
    added = {name: str(value) for name, value in environment.items()}
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **added,
                   "PYTHONPATH": os.pathsep.join([*filter(None, [added.get("PYTHONPATH")]), str(REPO)])}
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dist") / "images", classes=("a", "b", "c"), per_class=5)


@pytest.fixture(scope="module")
def single(images, tmp_path_factory):
    from cli import main

    out = tmp_path_factory.mktemp("single") / "cache"
    with pytest.raises(SystemExit) as done:
        main([*EXTRACT, "--data", str(images), "--out", str(out)])
    assert done.value.code == 0
    return CacheReader(out)


def assert_same_cache(reader, reference):
    assert list(reader.load_column("sample_id")) == list(reference.load_column("sample_id"))
    np.testing.assert_array_equal(reader.load_column("target"), reference.load_column("target"))
    np.testing.assert_allclose(reader.load("pool5"), reference.load("pool5"), atol=1e-5, rtol=0)
    assert reader.manifest.complete and len(reader.shards) == reference.manifest.num_shards


def test_two_processes_write_the_cache_of_one(images, single, tmp_path):
    result = torchrun(*EXTRACT, "--data", images, "--out", tmp_path / "c")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote ") == 1 and "5 shards new" in result.stdout  # rank 0 reports for both
    assert_same_cache(CacheReader(tmp_path / "c"), single)
    # rank 1's records joined shards.jsonl: the cache is its manifest, records and shards, copied as such
    assert not list((tmp_path / "c").glob("shards-rank*"))
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in [tmp_path / "c" / "manifest.json", tmp_path / "c" / "shards.jsonl", *(tmp_path / "c").glob("shard-*.h5")]:
        (copy / path.name).write_bytes(path.read_bytes())
    assert_same_cache(CacheReader(copy), single)


def test_resume_with_another_world_size(run_tl, images, single, tmp_path):
    assert torchrun(*EXTRACT, "--data", images, "--out", tmp_path / "c").returncode == 0
    for shard in ("shard-00001.h5", "shard-00004.h5"):  # one of each rank's shards is lost
        (tmp_path / "c" / shard).unlink()
    resumed = run_tl(*EXTRACT, "--data", images, "--out", tmp_path / "c")
    assert resumed.code == 0 and "2 shards new, 3 reused" in resumed.out, resumed
    assert_same_cache(CacheReader(tmp_path / "c"), single)
    (tmp_path / "c" / "shard-00000.h5").unlink()
    again = torchrun(*EXTRACT, "--data", images, "--out", tmp_path / "c")
    assert again.returncode == 0 and "1 shard new, 4 reused" in again.stdout, again.stderr[-2000:]
    assert_same_cache(CacheReader(tmp_path / "c"), single)


def test_a_dying_rank_stops_the_other_and_the_rerun_completes(images, single, tmp_path):
    broken = tmp_path / "images"
    subprocess.run(["cp", "-r", str(images), str(broken)], check=True)
    image = broken / "b" / "img00.png"  # sample 5: shard 1, which rank 1 writes
    image.write_bytes(image.read_bytes()[:40])
    failed = torchrun(*EXTRACT, "--data", broken, "--out", tmp_path / "c", "--on-error", "fail")
    assert failed.returncode != 0
    assert "error: cannot decode b/img00.png" in failed.stderr
    manifest = cache_document(tmp_path / "c")
    assert not manifest["complete"]
    survivors = sorted(p.name for p in (tmp_path / "c").glob("shard-*.h5"))
    assert "shard-00001.h5" not in survivors
    rerun = torchrun(*EXTRACT, "--data", broken, "--out", tmp_path / "c", "--on-error", "skip")
    assert rerun.returncode == 0, [line for line in rerun.stderr.splitlines() if "error:" in line]
    assert f"{len(survivors)} reused" in rerun.stdout and "1 image skipped" in rerun.stdout
    done, reference = CacheReader(tmp_path / "c"), single
    kept = [i for i, sample in enumerate(reference.load_column("sample_id")) if sample != "b/img00.png"]
    assert list(done.load_column("sample_id")) == [reference.load_column("sample_id")[i] for i in kept]
    np.testing.assert_allclose(done.load("pool5"), reference.load("pool5")[kept], atol=1e-5, rtol=0)
    assert done.manifest.complete and done.manifest.skipped[0]["sample_id"] == "b/img00.png"


def test_torchrun_stopped_by_sigterm_says_so_on_every_rank(tmp_path):
    """`kill`, `timeout` or scancel on torchrun: it sends SIGTERM to every rank. Each rank said "stopped
    because another rank failed" (none had) and exited 2; a DataLoader's finalizer could add a traceback.
    A bad TL_DISTRIBUTED_TIMEOUT was a ValueError at import, even in one process."""
    import signal
    import time

    # 30 shards: the signal, sent once the first is written, must find the ranks still at work (the
    # module's 15 images were all written, at times, before it arrived, and no rank had anything to say)
    images = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=30)
    out = tmp_path / "c"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "localhost:0", "-m", "cli", *EXTRACT[:-3], "--workers", "1", "--batch-size", "1",
               "--quiet", "--data", str(images), "--out", str(out)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not list(out.glob("shard-*.h5")):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert sorted(line.split(" stopped by SIGTERM")[0] for line in ours) == ["error: rank 0", "error: rank 1"], err
    assert all("torchrun stops every rank when one fails or when it is stopped itself" in line for line in ours)
    assert "another rank failed" not in err and f'File "{REPO}' not in err and "Exception ignored" not in err
    # one process completes the cache; TL_DISTRIBUTED_TIMEOUT is read only where ranks wait for each other
    resumed = subprocess.run([sys.executable, "-m", "cli", *EXTRACT, "--data", str(images), "--out", str(out)],
                             cwd=REPO, capture_output=True, text=True, env={**environment, "TL_DISTRIBUTED_TIMEOUT": "abc"})
    assert resumed.returncode == 0 and "reused" in resumed.stdout, resumed
    from pipeline import distributed

    for value in ("2.5", "abc", "\u00b2", "0"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TL_DISTRIBUTED_TIMEOUT", value)
            with pytest.raises(distributed.DistributedError, match="TL_DISTRIBUTED_TIMEOUT must be a whole number of "
                                                                   f"seconds above 0, got '{value}'"):
                distributed.timeout_seconds()


def test_two_process_finetune_matches_one_process_checkpoints_and_resumes(run_tl, tmp_path):
    """16 images in global batches of 5 (shares of 3 and 2, and 1 and none in the last step): both runs
    see the same batches and, since augmentation is drawn per (epoch, image), the same crops; each rank's
    loss is weighed by its share, as DDP averages the ranks' gradients. Batches of 5 over 2 ranks used to
    train batches of 4, and 17 images (padded to 18) one image twice."""
    from pipeline.model_files import checkpoint_paths, load_model_file

    images = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=6)
    for extra in sorted((images / "c").iterdir())[:2]:
        extra.unlink()
    assert run_tl(*EXTRACT, "--data", images, "--out", tmp_path / "c").code == 0
    assert run_tl("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "head.pt").code == 0
    val = shutil.copytree(images, tmp_path / "val")  # the same pixels; --val-data of the training folder is refused
    common = ["finetune", "--data", images, "--head", tmp_path / "head.pt", "--unfreeze", "1", "--lr", "1e-4",
              "--batch-size", "5", "--val-data", val, "--quiet"]
    alone = run_tl(*common, "--epochs", "2", "--out", tmp_path / "alone.pt")
    assert alone.code == 0, alone
    first = torchrun(*common, "--epochs", "1", "--out", tmp_path / "pair.pt")
    assert first.returncode == 0, [line for line in first.stderr.splitlines() if "rror" in line]
    assert first.stdout.count("wrote ") == 1  # rank 0 speaks for both
    last, best = checkpoint_paths(tmp_path / "pair.pt")
    assert last.is_file() and best.is_file() and len(list(tmp_path.glob("pair*"))) == 3  # one set, one model
    resumed = torchrun(*common, "--epochs", "2", "--out", tmp_path / "pair.pt", "--resume")
    assert resumed.returncode == 0 and "resumed after epoch 1" in resumed.stdout, resumed.stderr[-1500:]
    _, pair = load_model_file(tmp_path / "pair.pt")
    _, single_process = load_model_file(tmp_path / "alone.pt")
    assert [point["epoch"] for point in pair["history"]] == [1, 2]
    for ours, theirs in zip(pair["history"], single_process["history"]):
        for name in ("train_loss", "val_loss"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-3, abs=1e-5), (name, ours, theirs)


def test_four_ranks_over_tars_miss_no_row_and_equal_one_process(tmp_path):
    """Four gloo ranks over five tars: each tar is read by one rank (tar t by rank t mod 4), no sample is
    missing or written twice, and the cache equals a single process's; a rank's tars redone after a
    repair touch only their shards."""
    from cli import main
    from tests.conftest import write_webdataset

    tars = write_webdataset(tmp_path, tars=5, per_tar=4)
    args = [*EXTRACT, "--format", "webdataset", "--data", tars]
    result = torchrun(*args, "--out", tmp_path / "c", processes=4)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote ") == 1 and "10 shards new" in result.stdout  # 2 shards of 3 + 1 per tar
    with pytest.raises(SystemExit) as done:
        main([*map(str, args), "--out", str(tmp_path / "single")])
    assert done.value.code == 0
    ranked, single = CacheReader(tmp_path / "c"), CacheReader(tmp_path / "single")
    ids = list(ranked.load_column("sample_id"))
    assert len(ids) == len(set(ids)) == 20 and sorted(ids) == sorted(single.load_column("sample_id"))
    assert_same_cache(ranked, single)


def test_tars_inserted_first_move_the_kept_shards_and_no_rank_writes_over_them(tmp_path):
    """Two tars put before the others move every kept shard two tars on; the kept shards keep their files,
    whose names are those of the new shards' indices: each rank (rank 1 writes the second new tar) gives its
    new shards other names, learnt from the manifest rank 0 saved, and the cache equals one process's."""
    from cli import main
    from tests.conftest import write_webdataset

    tars = write_webdataset(tmp_path, tars=3, per_tar=4)  # 2 shards a tar (3 + 1 images)
    args = [*EXTRACT, "--format", "webdataset", "--data", tars]
    assert torchrun(*args, "--out", tmp_path / "c").returncode == 0
    kept = {path.name: path.read_bytes() for path in (tmp_path / "c").glob("shard-*.h5")}
    for name, source in (("0.tar", "00001.tar"), ("00.tar", "00002.tar")):  # listed before 00000.tar
        (tars / name).write_bytes((tars / source).read_bytes())
    result = torchrun(*args, "--out", tmp_path / "c")
    assert result.returncode == 0 and "4 shards new, 6 reused" in result.stdout, result.stderr[-2000:]
    shards = [(s.index, s.file) for s in CacheReader(tmp_path / "c").shards]
    assert shards == [(k, f"shard-{k:06d}.h5") for k in range(4)] + [(k + 4, f"shard-{k:05d}.h5") for k in range(6)]
    assert all((tmp_path / "c" / name).read_bytes() == data for name, data in kept.items())
    with pytest.raises(SystemExit) as done:
        main([*map(str, args), "--out", str(tmp_path / "single")])
    assert done.value.code == 0
    assert_same_cache(CacheReader(tmp_path / "c"), CacheReader(tmp_path / "single"))


def torchrun_opening_tars(tmp_path, *args):
    """torchrun(*args), the names of the tars each rank opened ({rank: names}), seen by an audit hook (Python's
    `open` event), and the ids of the samples each rank held once it extracted ({rank: ids}, from Source.hold),
    both recorded by a sitecustomize module in each rank."""
    hooks, opened, held = tmp_path / "hooks", tmp_path / "opened", tmp_path / "held"
    for folder in (opened, held):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if 'RANK' in os.environ:\n"
        "    opened = open(os.path.join(os.environ['TL_TEST_OPENED'], os.environ['RANK']), 'a')\n"
        "    def hook(event, args):\n"
        "        if event == 'open' and str(args[0]).endswith('.tar'):\n"
        "            opened.write(os.path.basename(str(args[0])) + '\\n')\n"
        "            opened.flush()\n"
        "    sys.addaudithook(hook)\n"
        "    from pipeline.formats.webdataset import WebDatasetSource\n"
        "    hold = WebDatasetSource.hold\n"
        "    def held(self, ranges):\n"
        "        hold(self, ranges)\n"
        "        with open(os.path.join(os.environ['TL_TEST_HELD'], os.environ['RANK']), 'w') as record:\n"
        "            ids = self.samples.held\n"
        "            record.write(''.join(ids.sample_id(i) + '\\n' for i in range(len(ids))))\n"
        "    WebDatasetSource.hold = held\n")
    result = torchrun(*args, PYTHONPATH=hooks, TL_TEST_OPENED=opened, TL_TEST_HELD=held)
    return result, {path.name: set(path.read_text().split()) for path in opened.iterdir()}, \
        {path.name: path.read_text().split() for path in held.iterdir()}


def test_ranks_list_a_share_of_the_tars_each_and_fail_together(tmp_path):
    """Under torchrun each rank listed every tar (T tars, N ranks: T headers read per rank, N*T in all): now
    rank r lists tar t only when t % N == r, and the ranks exchange each tar's count and labels (they exchanged
    every tar's columns: the whole data set on each rank). An audit hook (Python's `open` event) counts the tars
    each rank opens, to list them and to read their images: its own only; a rank holds its own tars' samples
    only. The classes, samples, warnings (a damaged tar), cache key, shard plan and the listings kept equal one
    process's, with --samples-per-class (every target gathered) too. A tar that one rank cannot read stops
    every rank with that rank's line, not the others at the timeout."""
    from cli import main
    from pipeline.formats import open_source
    from tests.conftest import write_webdataset

    tars = write_webdataset(tmp_path, tars=5, per_tar=4)
    whole = (tars / "00003.tar").read_bytes()
    (tars / "00003.tar").write_bytes(whole[:len(whole) // 2])  # cut short: a warning, and its entries after the cut
    args = [*EXTRACT, "--format", "webdataset", "--data", tars]
    result, opened, held = torchrun_opening_tars(tmp_path, *args, "--out", tmp_path / "c")
    assert result.returncode == 0, result.stderr[-2000:]
    assert opened == {"0": {"00000.tar", "00002.tar", "00004.tar"}, "1": {"00001.tar", "00003.tar"}}, opened
    with pytest.raises(SystemExit) as done:
        main([*map(str, args), "--out", str(tmp_path / "single")])
    assert done.value.code == 0
    # each rank held the samples of its tars only, in order (its shards' ranges of the whole's numbering)
    ids = [sample.sample_id for sample in open_source("webdataset", tars).samples]
    assert held == {str(rank): [i for i in ids if int(i[:5]) % 2 == rank] for rank in (0, 1)}, held
    ranked, single = cache_document(tmp_path / "c"), cache_document(tmp_path / "single")
    for name in ("key", "classes", "warnings", "num_samples", "skipped"):
        assert ranked[name] == single[name], name
    plan = [[shard[name] for name in ("index", "first", "samples", "inputs")] for shard in single["shards"]]
    assert [[shard[name] for name in ("index", "first", "samples", "inputs")] for shard in ranked["shards"]] == plan
    assert any("00003.tar is damaged" in line for line in ranked["warnings"])
    assert_same_cache(CacheReader(tmp_path / "c"), CacheReader(tmp_path / "single"))
    kept = {path.name: path.read_bytes() for path in (tmp_path / "c" / "listings").iterdir()}
    assert len(kept) == 5 and kept == {path.name: path.read_bytes() for path in (tmp_path / "single" / "listings").iterdir()}
    result, _, held = torchrun_opening_tars(tmp_path, *args, "--samples-per-class", "2", "--out", tmp_path / "s2")
    assert result.returncode == 0, result.stderr[-2000:]
    with pytest.raises(SystemExit) as done:
        main([*map(str, args), "--samples-per-class", "2", "--out", str(tmp_path / "single2")])
    assert done.value.code == 0
    ranked, single = cache_document(tmp_path / "s2"), cache_document(tmp_path / "single2")
    assert [[shard[name] for name in ("index", "first", "samples", "inputs")] for shard in ranked["shards"]] == [
        [shard[name] for name in ("index", "first", "samples", "inputs")] for shard in single["shards"]]
    assert ranked["key"] == single["key"] and ranked["num_samples"] == single["num_samples"] == 6
    assert sorted(held["0"] + held["1"]) == sorted(CacheReader(tmp_path / "single2").load_column("sample_id"))

    if not sys.platform.startswith("linux"):
        return
    # /proc/self/mem is a regular file whose first page cannot be read (EIO): tar 1, rank 1's to list
    failed = torchrun(*EXTRACT, "--format", "webdataset", "--data", f"{{{tars / '00000.tar'},/proc/self/mem}}",
                      "--out", tmp_path / "d", TL_DISTRIBUTED_TIMEOUT=100)
    ours = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert failed.returncode != 0 and ours == ["error: rank 1: cannot read /proc/self/mem: Input/output error; "
                                               "check the file and re-run"] * 2, failed.stderr[-2000:]
    assert f'File "{REPO}' not in failed.stderr and "Exception ignored" not in failed.stderr
    assert not (tmp_path / "d" / "listings").exists()


def test_finetune_ranks_list_a_share_of_the_tars_each(run_tl, tmp_path):
    """finetune opened its webdataset source as extract did before its ranks shared the listing: every rank
    listed every tar. With --epochs 0 no image is read for training, so the tars a rank opens are those it
    lists: its own share, of the training tars and of the validation tars."""
    from tests.conftest import write_webdataset

    tars = write_webdataset(tmp_path, tars=5, per_tar=4)
    assert run_tl(*EXTRACT, "--format", "webdataset", "--data", tars, "--out", tmp_path / "c").code == 0
    assert run_tl("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "head.pt").code == 0
    result, opened, held = torchrun_opening_tars(tmp_path, "finetune", "--format", "webdataset", "--data", tars,
                                                 "--head", tmp_path / "head.pt", "--epochs", "0", "--out",
                                                 tmp_path / "m.pt", "--quiet")
    assert result.returncode == 0 and (tmp_path / "m.pt").is_file(), result.stderr[-2000:]
    assert opened == {"0": {"00000.tar", "00002.tar", "00004.tar"}, "1": {"00001.tar", "00003.tar"}}, opened
    assert held == {}  # its sampler draws from every sample on every rank


def test_a_rank_on_cuda_binds_its_gpu_to_the_group_and_one_on_the_cpu_uses_gloo(monkeypatch):
    """nccl's barrier takes the current device with a warning on rank 0 unless the group knows its GPU."""
    import torch
    import torch.distributed

    from pipeline import distributed

    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **options: joined.append((backend, options["device_id"])))
    monkeypatch.setattr(distributed.signal, "signal", lambda *args: None)
    world = distributed.World(rank=1, size=2, local_rank=1)
    distributed.start(world, torch.device("cuda", 1))
    distributed.start(world, torch.device("cpu"))
    assert joined == [("nccl", torch.device("cuda", 1)), ("gloo", None)]


RANK_WAITING = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from pipeline import distributed
assert distributed.dies_with_launcher(signal.SIGKILL if {joining} else 0)
print(os.getpid(), flush=True)
time.sleep(60)  # as a rank blocked in init_process_group
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no reaper took is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("joining", [True, False])
def test_a_rank_joining_the_group_dies_with_its_launcher(joining):
    """torchrun's launcher SIGKILLed while its ranks joined the process group left them blocked there (no Python
    signal handler runs) for TL_DISTRIBUTED_TIMEOUT, 30 minutes; a rank now dies with its parent until it has
    joined, and after that (`dies_with_launcher(0)`) carries on as before."""
    import time

    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                                 f"'-c', {RANK_WAITING.format(repo=str(REPO), joining=joining)!r}]); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + (10 if joining else 2)  # a rank that stays stays
    while _alive(rank) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert _alive(rank) is not joining
    finally:
        if _alive(rank):
            os.kill(rank, signal.SIGKILL)
