"""Which codes make the quickstart's digits work: logreg test accuracy on every one of scikit-learn's
1,797 digits (the quickstart's 75/25 split, 450 test), raw 8x8 pixels against efficientnet_lite0 codes
of each tap, the digits drawn as the quickstart draws them. Records a section of bench/RESULTS.md.

    python bench/quickstart_levers.py [--per-class N] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import CacheReader  # noqa: E402
from pipeline.examples import digits_split, write_digits  # noqa: E402
from pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from pipeline.heads import LogRegHead  # noqa: E402
from results import publish  # noqa: E402

COSTS = [0.001, 0.01, 0.1, 1.0, 10.0]


def accuracy(train_codes, train_targets, test_codes, test_targets, seed: int = 0) -> tuple[float, float]:
    """(test accuracy, chosen C) of a logreg head with C chosen on a stratified fifth of the training rows."""
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(np.arange(len(train_targets)), test_size=0.2, random_state=seed,
                                stratify=train_targets)
    head = LogRegHead(C=COSTS, seed=seed).fit(train_codes[fit], train_targets[fit], train_codes[val],
                                              train_targets[val])
    return float(np.mean(head.predict(test_codes) == test_targets)), head.C_


def main(argv=None) -> None:
    from sklearn.datasets import load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=None, help="digits of each class (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    digits = load_digits()
    split = digits_split(per_class=args.per_class)
    rows = [f"| raw 8x8 pixels | 64 | {accuracy(digits.data[split['train']], digits.target[split['train']], digits.data[split['test']], digits.target[split['test']])[0]:.4f} | - |"]  # noqa: E501
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "digits"
        write_digits(data, per_class=args.per_class)
        caches, seconds = {}, {}
        for name in ("train", "test"):
            started = time.perf_counter()
            run_extract(ExtractConfig(data=data, split=name, out=Path(scratch) / name, layers=("pool", "block12"),
                                      quiet=True))
            seconds[name] = time.perf_counter() - started
            caches[name] = CacheReader(Path(scratch) / name)
        for tap in ("pool", "block12"):
            found, cost = accuracy(caches["train"].load(tap).astype(np.float64), caches["train"].load_column("target"),
                                   caches["test"].load(tap).astype(np.float64), caches["test"].load_column("target"))
            rows.append(f"| efficientnet_lite0 `{tap}` | {caches['train'].taps[tap]} | {found:.4f} | {cost:g} |")
    header = (f"scikit-learn's digits, {len(split['train'])} train / {len(split['test'])} test (the quickstart's "
              f"seeded 75/25 split), drawn at 64 px as the quickstart draws them; logreg with C chosen from "
              f"{', '.join(f'{c:g}' for c in COSTS)} on a stratified fifth of the training rows. Extraction of "
              f"both taps took {sum(seconds.values()):.0f} s on this machine. "
              f"Command: `python bench/quickstart_levers.py`")
    publish("## quickstart: which codes", header,
            ["| codes | width | test accuracy | C |", "|---|---:|---:|---:|", *rows], write=not args.no_write)


if __name__ == "__main__":
    main()
