"""What listing webdataset tars costs per image: T tars of N small images each (KEY.jpg + KEY.cls, as img2dataset
writes them), opened as `tl extract --format webdataset` opens them, three ways, in interleaved rounds in one
process: tl's own ustar header reader (pipeline/formats/tar_headers.scan_tar), Python's tarfile alone (what
any tar that reader does not take goes through), and a second run over the same tars that finds their kept
listings (`OUT/listings/`, no tar header read). Reports the median µs per image of each. The images are
random bytes: listing reads headers and label files, never an image. Writes the section "webdataset tar
listing" of bench/RESULTS.md.

    python bench/tar_listing.py
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results import publish, where_and_when  # noqa: E402

SECTION = "## webdataset tar listing"
WAYS = ("tl's header reader", "tarfile alone", "kept listings")


def write_tars(folder: Path, tars: int, per_tar: int, seed: int = 0) -> None:
    """`tars` ustar tars of `per_tar` images of 2-6 kB (random bytes) with a .cls label each."""
    chance = random.Random(seed)
    for number in range(tars):
        with tarfile.open(folder / f"{number:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(per_tar):
                key = f"{number * per_tar + index:09d}"
                for name, data in ((f"{key}.jpg", chance.randbytes(chance.randrange(2000, 6000))),
                                   (f"{key}.cls", str(index % 10).encode())):
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))


def listed(folder: Path, way: str, listings: Path) -> float:
    """Seconds to open the tars of `folder` one `way`."""
    from pipeline.formats import open_source, webdataset

    scan = webdataset.scan_tar
    if way == "tarfile alone":
        webdataset.scan_tar = lambda *args: None  # what a tar the header reader does not take goes through
    try:
        started = time.perf_counter()
        source = open_source("webdataset", folder, listings=listings if way == "kept listings" else None)
        seconds = time.perf_counter() - started
    finally:
        webdataset.scan_tar = scan
    if way == "kept listings" and source.listings.reused == 0:
        raise SystemExit("the kept listings were not used; the bench measures nothing")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=200)
    parser.add_argument("--per-tar", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if min(args.tars, args.per_tar, args.rounds) < 1:
        raise SystemExit("--tars, --per-tar and --rounds must be at least 1")

    from pipeline.formats import open_source

    images = args.tars * args.per_tar
    with tempfile.TemporaryDirectory(prefix="tl-tars-") as scratch:
        folder, listings = Path(scratch) / "tars", Path(scratch) / "listings"
        folder.mkdir()
        write_tars(folder, args.tars, args.per_tar)
        kept = open_source("webdataset", folder, listings=listings)  # keeps the listings (and warms the page cache)
        kept.listings.save()
        times = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                times[way].append(listed(folder, way, listings))
    table = ["| way | µs per image (median) | s per run (min-max) |", "|---|---:|---:|"]
    for way in WAYS:
        table.append(f"| {way} | {statistics.median(times[way]) / images * 1e6:.1f} "
                     f"| {min(times[way]):.2f}-{max(times[way]):.2f} |")
    header = (f"{args.tars} ustar tars of {args.per_tar} images (2-6 kB) with a .cls label each, opened as tl extract "
              f"opens them, {args.rounds} interleaved rounds in one process, warm page cache; {where_and_when()}. "
              "Command: `python bench/tar_listing.py`")
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
