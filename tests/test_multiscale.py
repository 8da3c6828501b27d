"""Oquab patch geometry, the labelling rule, background sampling and image-level pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.datasets import Annotation
from pipeline.multiscale import (
    DEFAULT_SCALES,
    keep_background,
    label_patches,
    patch_grid,
    pool_image_scores,
)


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500)])
def test_patch_grid_counts_positions_and_coverage(width, height):
    boxes, scales = patch_grid(width, height)
    assert sorted(set(scales.tolist())) == pytest.approx(list(DEFAULT_SCALES))
    total = 0
    for scale in DEFAULT_SCALES:
        at_scale = boxes[np.isclose(scales, scale)]
        side = (min(width, height) - 1) / scale
        across, down = math.ceil((width - 1) / side - 1e-9), math.ceil((height - 1) / side - 1e-9)
        assert len(at_scale) == across * down
        total += across * down
        np.testing.assert_allclose(at_scale[:, 2] - at_scale[:, 0], side)
        np.testing.assert_allclose(at_scale[:, 3] - at_scale[:, 1], side)
        assert at_scale[:, :2].min() >= 0 and at_scale[:, 2].max() <= width - 1 + 1e-9
        assert at_scale[:, 3].max() <= height - 1 + 1e-9
        # evenly spread from edge to edge: the first starts at 0, the last ends at the border
        xs, ys = np.unique(at_scale[:, 0].round(9)), np.unique(at_scale[:, 1].round(9))
        assert xs[0] == 0 and xs[-1] + side == pytest.approx(width - 1) if len(xs) > 1 else True
        assert len(xs) < 3 or np.allclose(np.diff(xs), np.diff(xs)[0])
        assert len(ys) < 3 or np.allclose(np.diff(ys), np.diff(ys)[0])
        # the patches of one scale cover every pixel index of the image
        covered = np.zeros((height, width), bool)
        for x0, y0, x1, y1 in at_scale:
            covered[math.floor(y0):math.floor(y1) + 1, math.floor(x0):math.floor(x1) + 1] = True
        assert covered.all(), f"scale {scale} leaves pixels uncovered"
    assert len(boxes) == total
    one = boxes[np.isclose(scales, 1.0)]
    assert len(one) == 2 and one[0, 2] - one[0, 0] == min(width, height) - 1  # the two largest squares


def test_the_two_orientations_mirror_each_other():
    wide, _ = patch_grid(500, 375)
    tall, _ = patch_grid(375, 500)
    assert len(wide) == len(tall)
    np.testing.assert_allclose(np.sort(wide[:, [1, 0, 3, 2]], axis=0), np.sort(tall, axis=0))


PATCH = np.array([[0.0, 0.0, 100.0, 100.0]])  # area 10,000


@pytest.mark.parametrize("box,expected", [
    ([10, 10, 60, 60], 1),     # one box inside: 25% of the patch, all of the box -> labelled
    ([0, 0, 40, 40], 0),       # small box: fully inside, covers 16% of the patch -> background
    ([0, 0, 100, 150], 1),     # big box: covers the patch fully, patch covers 67% of the box -> labelled
    ([0, 0, 100, 200], 0),     # bigger box: the patch holds only 50% of it -> background
])
def test_one_box(box, expected):
    assert label_patches(PATCH, np.array([box], float), np.array([0]))[0] == expected


def test_two_boxes_that_both_qualify_make_background_and_one_that_does_wins():
    both = np.array([[0, 0, 60, 60], [40, 40, 100, 100]], float)  # each 36% of the patch, fully inside
    assert label_patches(PATCH, both, np.array([2, 5]))[0] == 0
    one = np.array([[0, 0, 60, 60], [90, 90, 100, 100]], float)  # the second covers 1% of the patch
    assert label_patches(PATCH, one, np.array([2, 5]))[0] == 3  # class 2 -> target 3 (0 is background)
    thresholds = label_patches(PATCH, np.array([[0, 0, 40, 40]], float), np.array([0]), patch_overlap=0.15)
    assert thresholds[0] == 1
    assert label_patches(PATCH, np.zeros((0, 4)), np.zeros(0, int))[0] == 0  # no objects: background


def test_background_sampling_keeps_objects_and_a_seeded_fraction():
    targets = np.array([0] * 10000 + [3] * 50)
    keep = keep_background(targets, 0.1, np.random.default_rng(0))
    assert keep[-50:].all() and 0.09 < keep[:10000].mean() < 0.11
    np.testing.assert_array_equal(keep, keep_background(targets, 0.1, np.random.default_rng(0)))
    assert keep_background(targets, None, np.random.default_rng(0)).all()


def test_pooling_sums_patch_scores_to_the_exponent():
    scores = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.1, 0.0, 0.9]])
    ids, pooled = pool_image_scores(scores, np.array(["b", "b", "a"]), exponent=2)
    assert ids.tolist() == ["b", "a"]
    np.testing.assert_allclose(pooled, [[0.25 + 0.16, 0.16], [0.0, 0.81]])


class _Photos:
    """A source of JPEG files, as the formats read them (open_rgb with a draft)."""

    def __init__(self, paths, annotations=None):
        self.paths = paths
        if annotations is not None:
            self.annotations = annotations

    def __len__(self):
        return len(self.paths)

    def read_image(self, index, draft=None):
        from pipeline.datasets import open_rgb

        return open_rgb(str(self.paths[index]), draft)


def _photo(path, width, height):
    from PIL import Image

    rng = np.random.default_rng(width)
    gradient = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    pixels = np.clip(gradient + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_fast_patches_decode_large_jpegs_smaller_and_keep_every_patch_from_at_least_its_size(tmp_path):
    from pipeline.multiscale import PatchImages, PatchSettings, patch_draft

    scales = (1.0, 1.6, 2.3)
    assert patch_draft(scales, 224, "exact") is None  # the full decode
    draft = patch_draft(scales, 224, "fast")
    for width, height in [(4032, 3024), (1024, 768), (500, 375), (375, 500)]:
        needed = draft(width, height)
        scale = 1
        for factor in (8, 4, 2):  # what Pillow's draft then decodes at
            if min(width // needed[0], height // needed[1]) >= factor:
                scale = factor
                break
        smallest_patch = (min(width, height) - 1) / max(scales)
        # never below the input size; a patch already smaller than that is decoded at full size
        assert smallest_patch / scale >= min(224, smallest_patch) and (scale > 1) == (smallest_patch >= 448)

    # a landscape photo and an odd-sized portrait one (1/4 and 1/2 scale), and a VOC-sized one (full size)
    paths = [_photo(tmp_path / "big.jpg", 2048, 1536), _photo(tmp_path / "odd.jpg", 1537, 2049),
             _photo(tmp_path / "voc.jpg", 500, 375)]
    settings = PatchSettings(scales)
    exact = PatchImages(_Photos(paths), 224, settings, False, 0, "exact")
    fast = PatchImages(_Photos(paths), 224, settings, False, 0, "fast")
    for index in (0, 1):
        np.testing.assert_array_equal(fast[index].boxes, exact[index].boxes)  # the grid of the original size
        difference = np.abs(fast[index].pixels.numpy().astype(int) - exact[index].pixels.numpy().astype(int))
        assert 0 < difference.mean() < 1.5  # resampled from a reduced decode: a little different, never shifted
    np.testing.assert_array_equal(fast[2].pixels.numpy(), exact[2].pixels.numpy())  # nothing to reduce: identical


def test_stage_three_cuts_its_patches_in_the_heads_mode_and_fast_datasets_reach_spawned_workers(tmp_path):
    import pickle

    from pipeline.errors import TLError
    from pipeline.multiscale import PatchImages, PatchSamples, PatchSettings, patch_draft

    source = _Photos([_photo(tmp_path / "big.jpg", 2048, 1536)],
                     [Annotation(2048, 1536, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool))])
    settings = PatchSettings((1.0, 2.3))
    for mode in ("fast", "exact"):
        samples = PatchSamples(source, 224, settings, False, 0, lambda patch: np.asarray(patch), mode)
        images = PatchImages(source, 224, settings, False, 0, mode)[0]
        cut = np.stack([samples[position][0] for position in range(len(samples))])
        np.testing.assert_array_equal(cut, images.pixels.permute(0, 2, 3, 1).numpy())  # stage one's pixels
        pickle.loads(pickle.dumps(PatchImages(source, 224, settings, False, 0, mode)))  # spawn/forkserver workers
    with pytest.raises(TLError, match="unknown --decode sharp; valid: exact, fast"):
        patch_draft((1.0,), 224, "sharp")
