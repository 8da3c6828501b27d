"""The samples of webdataset tars held as columns: offsets, sizes, targets and tar numbers in numpy arrays, the keys
in one bytes blob; some 40 bytes an image where a Sample object each took some 280. A Sample is made when asked for.

What a tar lists (`TarEntries`) is made columns as soon as it is listed, on the rank that lists it, and travels
so to the other ranks (tl extract's ranks send its count and labels only: `TarSummary`); `TarSamples.joined` puts the
tars' columns end to end once the classes are known. A torchrun rank of `tl extract` keeps only the samples of its
tars (`HeldSamples`), numbered as in the whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.datasets import Sample

ESCAPED = ("utf-8", "surrogateescape")  # names that are not UTF-8 arrive surrogate-escaped: kept as their raw bytes
CHUNK = 1 << 16  # samples digested (or keys gathered) at once: a few MB at a time, whatever the count


class TarEntries:
    """One tar's listing entries ([key, data offset, size, label, problem] per image) as columns: the keys in
    one blob, the labels as numbers into `labels` (its distinct values, -1: none), the problems by row. Each
    column as narrow as its tar allows (key ends and sizes of 4 bytes; class numbers an int32 array, not Python
    ints of 28 bytes each): every tar's columns are held at once until joined."""

    def __init__(self, entries: list):
        keys = [entry[0].encode(*ESCAPED) for entry in entries]
        self.keys = b"".join(keys)
        self.key_ends = np.cumsum([len(key) for key in keys], dtype=np.int64 if len(self.keys) >= 2**31 else np.int32)
        self.offsets = np.array([entry[1] for entry in entries], np.int64)
        self.sizes = np.array([entry[2] for entry in entries], np.int64)
        if len(self.sizes) and self.sizes.max() < 2**32:
            self.sizes = self.sizes.astype(np.uint32)
        numbers: dict = {}  # label value -> its number; 3 and "3" (a json field of either) stay apart, as before
        self.label_numbers = np.array([-1 if entry[3] is None else numbers.setdefault(entry[3], len(numbers))
                                       for entry in entries], np.int32)
        self.labels = np.array(list(numbers), np.int32) if all(type(label) is int for label in numbers) else list(numbers)
        self.problem_rows = np.array([row for row, entry in enumerate(entries) if entry[4]], np.int64)
        self.problems = [entry[4] for entry in entries if entry[4]]

    def __len__(self) -> int:
        return len(self.offsets)

    def label_values(self) -> list:
        """The distinct labels, in the order first listed, as the listing gave them (ints, strings)."""
        return self.labels.tolist() if isinstance(self.labels, np.ndarray) else self.labels

    def clear(self) -> None:
        """Drop the columns (once joined elsewhere): their memory is freed now."""
        self.__init__([])


class TarSamples(Sequence):
    """The samples of a webdataset source, in listing order: `samples[i]` is the Sample the listing gave
    (id TAR/KEY, target, location "path\\0offset\\0size\\0problem", the tar's stamp), made on request. The
    columns answer the questions asked of every sample at once (targets, the runs of one tar, the fingerprint's
    inputs) without making any. `tars` holds (path, name, stamp) per tar; `tar_of` a sample's tar number."""

    def __init__(self, tars: list[tuple[str, str, str]], tar_of: np.ndarray, keys: bytes | bytearray,
                 key_ends: np.ndarray,
                 offsets: np.ndarray, sizes: np.ndarray, targets: np.ndarray, problem_rows: np.ndarray,
                 problems: list[str]):
        self.tars, self.tar_of, self.keys, self.key_ends = tars, tar_of, keys, key_ends  # key i: [ends[i], ends[i + 1])
        self.offsets, self.sizes, self.targets = offsets, sizes, targets
        self.problem_rows, self.problems = problem_rows, problems  # sorted rows of the samples listed unusable, why

    @classmethod
    def joined(cls, tars: list[tuple[str, str, str, TarEntries]], outcome) -> "TarSamples":
        """The samples of the tars (path, name, stamp, entries) end to end; `outcome(label) -> (target, problem or
        None)` (a label not among the classes: -1 and why) gives each distinct label's target. One column at a
        time is made whole, each tar's part of it freed once copied (its entries left empty), so the peak is the
        tars' columns and one joined column beside them, not two copies of every column."""
        entries = [entries for *_, entries in tars]
        counts = np.array([len(part) for part in entries], np.int64)
        firsts = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
        total, key_bytes = int(firsts[-1]), sum(len(part.keys) for part in entries)

        def column(dtype, part_of, whole=None):
            """One column (into `whole` if given) of every tar's values `part_of(number, entries)`, which frees them."""
            whole = np.empty(total, dtype) if whole is None else whole
            for number, part in enumerate(entries):
                whole[firsts[number]:firsts[number + 1]] = part_of(number, part)
            return whole

        problem_rows, problems = [], []

        def targets_of(number: int, part: TarEntries) -> np.ndarray:
            outcomes = [outcome(label) for label in part.label_values()]
            looked_up = np.array([target for target, _ in outcomes] + [-1], np.int32)  # number -1: no label
            refused = np.flatnonzero(np.isin(part.label_numbers, [n for n, (_, why) in enumerate(outcomes) if why]))
            rows = np.concatenate([part.problem_rows, refused])
            order = np.argsort(rows, kind="stable")
            reasons = part.problems + [outcomes[part.label_numbers[row]][1] for row in refused]
            problem_rows.append(rows[order] + firsts[number])
            problems.extend(reasons[k] for k in order)
            targets, part.label_numbers, part.problem_rows, part.problems = looked_up[part.label_numbers], None, None, None
            return targets

        def taken(name: str, shift=0):
            def part_of(number: int, part: TarEntries):
                values = getattr(part, name)
                setattr(part, name, None)
                # in 64 bits: numpy 1 keeps int32 key ends + an int64 shift that fits int32 as int32 (wrapped)
                return np.add(values, shift(number), dtype=np.int64) if shift else values
            return part_of

        targets = column(np.int32, targets_of)
        offsets = column(np.int64, taken("offsets"))
        wide = any(part.sizes.dtype != np.uint32 for part in entries if len(part.sizes))
        sizes = column(np.int64 if wide else np.uint32, taken("sizes"))  # 4 bytes an image less
        key_ends = np.zeros(total + 1, np.int64)  # key i: keys[ends[i]:ends[i + 1]]
        key_firsts = np.cumsum([0] + [len(part.keys) for part in entries])
        column(np.int64, taken("key_ends", lambda number: key_firsts[number]), key_ends[1:])
        keys = bytearray(key_bytes)
        for number, part in enumerate(entries):
            keys[key_firsts[number]:key_firsts[number + 1]], part.keys = part.keys, b""
        for part in entries:
            part.clear()  # copied: freed now, not with the source
        tar_of = np.repeat(np.arange(len(tars), dtype=np.int32), counts)  # once the tars' columns are gone
        return cls([(str(path), name, stamp) for path, name, stamp, _ in tars], tar_of, keys, key_ends, offsets,
                   sizes, targets, np.concatenate([np.zeros(0, np.int64), *problem_rows]), problems)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # a negative index counts from the end; IndexError past it
        path, offset, size, problem = self.where(index)
        location = f"{path}\0{offset}\0{size}\0{problem}"
        return Sample(self.sample_id(index), int(self.targets[index]), location, self.tars[self.tar_of[index]][2])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # a list of samples has none either

    def sample_id(self, index: int) -> str:
        key = self.keys[self.key_ends[index]:self.key_ends[index + 1]].decode(*ESCAPED)
        return f"{self.tars[self.tar_of[index]][1]}/{key}"

    def problem(self, index: int) -> str:
        """Why the listing found sample `index` unusable, or ""."""
        if not self.problems:
            return ""
        at = int(np.searchsorted(self.problem_rows, index))
        return self.problems[at] if at < len(self.problems) and self.problem_rows[at] == index else ""

    def where(self, index: int) -> tuple[str, int, int, str]:
        """(tar path, data offset, size, problem or "") of sample `index`."""
        return self.tars[self.tar_of[index]][0], int(self.offsets[index]), int(self.sizes[index]), self.problem(index)

    def runs(self) -> list[tuple[int, int]]:
        """(first, stop) of each run of consecutive samples of one tar."""
        starts = [0, *(np.flatnonzero(self.tar_of[1:] != self.tar_of[:-1]) + 1).tolist()] if len(self) else []
        return list(zip(starts, starts[1:] + [len(self)]))

    def inputs(self, first: int, last: int):
        """The bytes Source.sample_inputs gives for samples first..last-1, joined, in chunks of CHUNK samples."""
        for start in range(first, last, CHUNK):
            stop = min(last, start + CHUNK)
            tars, ends = self.tar_of[start:stop].tolist(), self.key_ends[start:stop + 1].tolist()
            heads = {tar: self.tars[tar][1].encode(*ESCAPED) + b"/" for tar in set(tars)}  # the chunk's tars only
            tails = {tar: self.tars[tar][2].encode(*ESCAPED) + b"\n" for tar in heads}
            yield b"".join(b"%s%s\0%d\0%s" % (heads[tar], self.keys[begin:end], target, tails[tar])
                           for tar, begin, end, target in zip(tars, ends, ends[1:], self.targets[start:stop].tolist()))

    def take(self, indices) -> "TarSamples":
        """The samples at `indices`, in that order."""
        rows = np.asarray(indices, np.int64).reshape(-1)
        begins, lengths = self.key_ends[rows], self.key_ends[rows + 1] - self.key_ends[rows]
        key_ends = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
        blob, keys = np.frombuffer(self.keys, np.uint8), []
        runs = np.flatnonzero(rows[1:] != rows[:-1] + 1) + 1  # where a run of consecutive rows begins, after the first
        if len(runs) < len(rows) // 64:  # a few runs (the shards a rank holds): their keys are slices of the blob
            for first, stop in zip([0, *runs.tolist()], [*runs.tolist(), len(rows)]):
                keys.append(blob[begins[first]:begins[stop - 1] + lengths[stop - 1]].tobytes())
        for start in range(0, len(rows) if not keys else 0, CHUNK):  # a position takes 8 bytes, a key's byte 1
            stop = min(len(rows), start + CHUNK)
            keys.append(blob[np.repeat(begins[start:stop] - key_ends[start:stop], lengths[start:stop])
                             + np.arange(key_ends[start], key_ends[stop])].tobytes())
        at = np.minimum(np.searchsorted(self.problem_rows, rows), max(len(self.problem_rows) - 1, 0))
        listed = self.problem_rows[at] == rows if len(self.problem_rows) else np.zeros(len(rows), bool)
        return TarSamples(self.tars, self.tar_of[rows], b"".join(keys), key_ends, self.offsets[rows], self.sizes[rows],
                          self.targets[rows], np.flatnonzero(listed), [self.problems[k] for k in at[listed].tolist()])


class TarSummary:
    """What the other torchrun ranks of tl extract learn of a tar one rank lists and keeps: its sample count and its
    distinct labels (the classes, and the warnings of classes without images, come from them), not its columns."""

    def __init__(self, entries: TarEntries):
        self.count, self.labels = len(entries), entries.labels

    def __len__(self) -> int:
        return self.count

    label_values = TarEntries.label_values


class HeldSamples:
    """Some samples of a whole (a torchrun rank's of tl extract: those of the tars it lists, then of the shards it
    extracts), still numbered as in the whole: `samples[i]`, `where(i)`, `problem(i)` and `sample_id(i)` take the
    index i of the whole, and len() is its count; an index not held raises LookupError (not IndexError: iterating
    does not end quietly at the first). What is asked of every sample at once (targets, the shards' digests) the
    source asks of the ranks together (WebDatasetSource)."""

    def __init__(self, held: TarSamples, ranges: list[tuple[int, int]], count: int):
        """`held`: the samples of `ranges` ((first, stop) in the whole, in order) end to end; `count`: the whole's."""
        ranges = [(first, stop) for first, stop in ranges if stop > first]
        self.firsts = np.array([first for first, _ in ranges], np.int64)
        self.stops = np.array([stop for _, stop in ranges], np.int64)
        self.starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(self.stops - self.firsts)])  # rows in `held`
        self.held, self.count = held, count

    @classmethod
    def of(cls, whole: TarSamples, ranges: list[tuple[int, int]]) -> "HeldSamples":
        """The samples of `ranges` of `whole`."""
        return cls(whole, [(0, len(whole))], len(whole)).hold(ranges)

    def rows(self, first: int, stop: int) -> np.ndarray:
        """The rows in `held` of samples first..stop-1, which one held range holds; LookupError if none does."""
        if stop <= first:
            return np.zeros(0, np.int64)
        start = self.row(first)
        if stop > self.stops[np.searchsorted(self.firsts, first, side="right") - 1]:
            raise LookupError(f"sample {stop - 1} is not held here (another torchrun rank extracts it)")
        return np.arange(start, start + stop - first)

    def holds(self, first: int, stop: int) -> bool:
        try:
            self.rows(first, stop)
        except LookupError:
            return False
        return True

    def hold(self, ranges: list[tuple[int, int]]) -> "HeldSamples":
        """Those of `ranges` only (each within a range held here)."""
        ranges = sorted((first, stop) for first, stop in ranges if stop > first)
        rows = [self.rows(first, stop) for first, stop in ranges]
        return HeldSamples(self.held.take(np.concatenate([np.zeros(0, np.int64), *rows])), ranges, self.count)

    def kept(self, indices) -> "HeldSamples":
        """Those held of the samples at `indices` of the whole (in increasing order), numbered as in that subset."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) > 1 and not (indices[1:] > indices[:-1]).all():
            raise ValueError("samples held by torchrun ranks are kept in their order only")
        lows, highs = np.searchsorted(indices, self.firsts), np.searchsorted(indices, self.stops)
        rows = [indices[low:high] - first + start
                for low, high, first, start in zip(lows, highs, self.firsts, self.starts)]
        return HeldSamples(self.held.take(np.concatenate([np.zeros(0, np.int64), *rows])),
                           list(zip(lows.tolist(), highs.tolist())), len(indices))

    def inputs(self, first: int, last: int):
        """TarSamples.inputs of samples first..last-1, which one held range holds."""
        rows = self.rows(first, last)
        return self.held.inputs(int(rows[0]), int(rows[-1]) + 1) if len(rows) else iter(())

    def row(self, index: int) -> int:
        """The row in `held` of sample `index` of the whole."""
        index = range(self.count)[index]
        at = int(np.searchsorted(self.firsts, index, side="right")) - 1
        if at < 0 or index >= self.stops[at]:
            raise LookupError(f"sample {index} is not held here (another torchrun rank extracts it)")
        return int(self.starts[at] + index - self.firsts[at])

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        return self.held[self.row(index)]

    def sample_id(self, index: int) -> str:
        return self.held.sample_id(self.row(index))

    def problem(self, index: int) -> str:
        return self.held.problem(self.row(index))

    def where(self, index: int) -> tuple[str, int, int, str]:
        return self.held.where(self.row(index))
