"""What a head or model accepts: codes of the same meaning (backbone, weights, preprocessing, patch
geometry), the layer and width it was fitted on, the same kind of labels, and classes it knows.
"""

from __future__ import annotations

import numpy as np

from cache.manifest import Manifest, decode_of, key_differences
from pipeline.errors import HeadError
from pipeline.multiscale import BACKGROUND


def codes_key(manifest: Manifest) -> dict:
    """What decides the meaning of a code; caches that differ here cannot share a head."""
    return {name: manifest.key[name] for name in ("backbone", "weights", "preprocessing", "patches")}


def check_codes_match(expected: dict, manifest: Manifest, what: str, reference: str,
                      remedy: str = "extract both with the same {}") -> None:
    """Refuse a cache whose codes mean something else than `expected`, naming every difference and what made
    it (a cache of another backbone lacks the layers too: this names the cause). `remedy` takes the parts."""
    found = codes_key(manifest)
    if found != expected:
        differences = "; ".join(key_differences(expected, found))
        decode = decode_of(expected.get("preprocessing") or {}) != decode_of(found.get("preprocessing") or {})
        parts = [(made, part) for name, made, part in (
            ("backbone", "by another backbone", "backbone"), ("weights", "with other weights", "weights"),
            ("preprocessing", "with other preprocessing", "preprocessing" + (" (--decode)" if decode else "")),
            ("patches", "with other patches", "patches (--multiscale, --scales, --patch-overlap, --box-overlap)"))
            if expected.get(name) != found.get(name)] or [("with other codes", "backbone, weights and preprocessing")]
        raise HeadError(f"{what} was made {' and '.join(made for made, _ in parts)} than {reference} ({differences}); "
                        + remedy.format(" and ".join(part for _, part in parts)))


def check_head_fits_cache(metadata: dict, multilabel: bool, manifest: Manifest, head_path, cache_path) -> None:
    """Refuse a cache that lacks the head's layer, holds other codes, or other kinds of targets."""
    layer = metadata["layer"]
    # the backbone first: a cache of another backbone lacks the layer too, and only this names the cause
    check_codes_match(metadata["codes_key"], manifest, f"cache {cache_path}",
                      f"the cache head {head_path} was trained on")
    if layer not in manifest.taps:
        raise HeadError(f"cache {cache_path} has no layer '{layer}', which head {head_path} was trained on; it has: "
                        f"{', '.join(manifest.taps)}; extract it with --layers {layer}")
    if manifest.taps[layer].width != metadata["width"]:
        raise HeadError(f"layer {layer} of cache {cache_path} is {manifest.taps[layer].width} wide, but head "
                        f"{head_path} expects {metadata['width']}")
    if multilabel != manifest.multilabel:
        kinds = ("multi-label", "single-label")
        raise HeadError(f"head {head_path} is {kinds[not multilabel]} but cache {cache_path} is "
                        f"{kinds[multilabel]}; evaluate on a cache of the same kind of labels")


def head_targets(targets: np.ndarray, data_classes: list[str], head_classes: list[str], data: str,
                 head: str) -> np.ndarray:
    """Targets renumbered from the data's classes into the head's (matched by name). `data` and `head`
    name the two in the error, e.g. "cache caches/test" and "head heads/h.pt"."""
    position = {name: index for index, name in enumerate(head_classes)}
    # -1: a sample listed without a usable label (a tar's), skipped when read; as an index it named the last class
    used = np.flatnonzero(targets.sum(axis=0)) if targets.ndim == 2 else np.unique(targets[targets >= 0])
    unknown = [data_classes[c] for c in used if data_classes[c] not in position]
    if unknown:
        raise HeadError(f"{data} has labels {head} does not know: {', '.join(unknown[:8])}"
                        f"{' ...' if len(unknown) > 8 else ''}; use data of the head's classes")
    if targets.ndim == 1:
        return np.array([position.get(name, -1) for name in data_classes] + [-1])[targets]
    return _in_head_columns(targets, data_classes, head_classes)


def _in_head_columns(matrix: np.ndarray, data_classes: list[str], head_classes: list[str]) -> np.ndarray:
    """A multi-hot matrix moved from the data's class columns to the head's (matched by name); columns of
    classes the head does not know are dropped."""
    renumbered = np.zeros((len(matrix), len(head_classes)), dtype=np.int64)
    for column, name in enumerate(data_classes):
        if name in head_classes:
            renumbered[:, head_classes.index(name)] = matrix[:, column]
    return renumbered


def head_ignore(ignore: np.ndarray | None, data_classes: list[str], head_classes: list[str]) -> np.ndarray | None:
    """A multi-hot ignore matrix (VOC's difficult-only classes) in the head's class order, matched by name;
    a class the head does not know has no AP to leave out, so it is dropped, not refused."""
    return None if ignore is None else _in_head_columns(ignore, data_classes, head_classes)


def check_patch_head(classes: list[str], path) -> None:
    """Refuse a head or model not fitted on multiscale patches where patch scores are pooled."""
    if classes[0] != BACKGROUND:
        raise HeadError(f"{path} was not trained on patches (its first class is not background); "
                        "fit a head on a --multiscale cache")
