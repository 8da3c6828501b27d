"""Images as the models of stages three and four see them: decoded in workers (a bad file reported,
never raised), whole or as labelled multiscale patches, augmented from a seed, batched per rank, scored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cache.manifest import decode_of
from pipeline import distributed
from pipeline.allocator import reused_memory
from pipeline.backbones import Backbone
from pipeline.compatibility import head_ignore, head_targets
from pipeline.datasets import DECODE_ERRORS, Source
from pipeline.decoding import NormalizedCrop
from pipeline.errors import FinetuneError, unreadable
from pipeline.formats import registered_formats
from pipeline.hardware import WorkerLoader, autocast, stack_channels_last, to_device
from pipeline.metrics import mean_ap, per_class_ap
from pipeline.multiscale import BACKGROUND, PatchSamples, PatchSettings, pool_image_scores
from pipeline.progress import progress
from pipeline.training import probabilities


def data_images(data, format: str, split) -> tuple[str, str | None]:
    """Which images `data` names for `split`, so that two spellings of one folder compare equal: the split
    sub-folder of formats that pick splits so (Source.split_by_folder) when it has one, else the path (a CSV, one
    tar or a brace pattern: the same images whatever the split); other formats their path and the split."""
    folder = Path(data) / str(split)
    if getattr(registered_formats().get(format), "split_by_folder", False):
        return os.path.realpath(folder if folder.is_dir() else data), None
    return os.path.realpath(data), str(split)


def refuse_training_images(val_data, val_split, data, split, format: str) -> None:
    """Finetune's --val-data naming its training images: every epoch would validate on what it trains on."""
    if data_images(val_data, format, val_split) == data_images(data, format, split):
        raise FinetuneError(f"--val-data {val_data} (split {val_split}) holds the training images: validation would "
                            "score the images finetune trains on; pass other images (--val-split), or --val-fraction")


class DecodedImages(Dataset):
    """(pixels or None, index, error) per sample: a bad file is reported, never raised, in a worker.
    `transform` takes the decoded PIL image; its `draft` attribute, if any, lets a JPEG decode smaller."""

    def __init__(self, source: Source, transform):
        self.source = source
        self.transform = transform
        self.draft = getattr(transform, "draft", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.transform(self.source.read_image(index, self.draft)), index, ""
        except DECODE_ERRORS as exc:
            return None, index, unreadable(exc)


def collate_decoded(items):
    good = [pixels for pixels, _, error in items if not error]
    pixels = stack_channels_last(good) if good else None
    return pixels, [index for _, index, error in items if not error], [(i, e) for _, i, e in items if e]


def image_loader(source: Source, backbone: Backbone, batches: list[list[int]], workers: int | None,
                 device: torch.device, decode: str = "exact") -> DataLoader:
    """Batches of (uint8 centre crops, indices, errors), decoded in worker processes in decoding mode
    `decode`, pinned for a CUDA device. uint8 crosses the worker boundary: 4x fewer bytes than float."""
    return batch_loader(DecodedImages(source, backbone.crop_decoder(decode)), batches, workers, device)


@dataclass(frozen=True)
class Augmentation:
    """How training images vary. The head was fitted on centre-crop codes, so the default is mild: a
    random crop of at least half the image's area (crop_scale 1: the backbone's resize and centre crop)
    and a horizontal flip (turn it off where mirroring changes the class: digits, text, traffic signs)."""

    crop_scale: float = 0.5
    flip: bool = True

    def check(self) -> None:
        if not 0 < self.crop_scale <= 1:
            raise FinetuneError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")


def image_set(source, backbone: Backbone, head_metadata: dict, augmentation: Augmentation | None, seed: int,
              background_fraction: float | None, what: str, head: str) -> tuple:
    """(dataset of (pixels, position, error) items, targets in the head's classes) for the head's kind
    of codes: whole images, or single patches labelled as in stage one for a multiscale head. With an
    `augmentation` (training) images vary and background patches are thinned; without one, every item
    is seen as in stage one. `what` and `head` name the data and the head in errors."""
    training = augmentation is not None
    normalize = backbone.normalization()
    flip = [transforms.RandomHorizontalFlip()] if training and augmentation.flip else []
    geometry = head_metadata["codes_key"]["patches"]
    if geometry:
        if not hasattr(source, "annotations"):
            raise FinetuneError(f"{head} was trained on multiscale patches; use voc data with it")
        settings = PatchSettings.of_geometry(geometry, background_fraction)
        dataset = PatchSamples(source, backbone.input_size, settings, training, seed,
                               transforms.Compose(flip + normalize),
                               decode_of(head_metadata["codes_key"]["preprocessing"]))
        return dataset, head_targets(dataset.targets, [BACKGROUND] + list(source.classes), head_metadata["classes"],
                                     what, head)
    if not training or augmentation.crop_scale == 1:
        # every image resized and centre-cropped as stage one saw it, the head's decoding mode included
        crop = backbone.crop_decoder(decode_of(head_metadata["codes_key"]["preprocessing"]))
        transform = NormalizedCrop(crop, backbone.mean, backbone.std, after=flip)
    else:
        crop = transforms.RandomResizedCrop(backbone.input_size, scale=(augmentation.crop_scale, 1.0), antialias=True,
                                            interpolation=transforms.InterpolationMode[backbone.interpolation.upper()])
        transform = transforms.Compose([crop, *flip, *normalize])
    return DecodedImages(source, transform), head_targets(source.targets(), source.classes, head_metadata["classes"],
                                                          what, head)


class SeededItems(torch.utils.data.Dataset):
    """Each item's random augmentation drawn from (epoch seed, item) alone: the same crops and flips
    whatever the batch size, worker count or number of ranks. Only the CPU generator the transforms draw
    from is seeded: torch.manual_seed would also reseed every GPU's generator (fork_rng(devices=[]) puts
    back the CPU's alone), and with --workers 0 the head's dropout on CUDA drew its masks from the seed of
    the batch's last image instead of the epoch's."""

    def __init__(self, dataset, epoch_seed: int):
        self.dataset, self.epoch_seed = dataset, epoch_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(np.random.default_rng([self.epoch_seed, index]).integers(2**62)))
            return self.dataset[index]


def batch_loader(dataset, batches: list[list[int]], workers: int | None, device) -> DataLoader:
    """Batches of (pixels, indices, errors) of `dataset` decoded in workers, pinned for CUDA, a few in flight."""
    return WorkerLoader(dataset, device, workers, batch_sampler=batches, collate_fn=collate_decoded)


def epoch_batches(size: int, current: distributed.World, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of one epoch: the items in the order torch's DistributedSampler shuffles them
    (from seed + epoch), cut into global batches of --batch-size, each dealt over the ranks (rank r takes
    every world-size-th item from the r-th). Step i of every rank together is step i of one process, with
    no item repeated, whatever the batch and the item count; a share may be one smaller or empty, which
    the loss weighs (finetune's _check_loss). Every rank has the same number of steps."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    return [order[start:start + batch_size][current.rank::current.size] for start in range(0, size, batch_size)]


def score_images(model: nn.Module, dataset, batch_size: int, workers: int | None, device,
                 multilabel: bool, precision: str = "float32", quiet: bool = True, desc: str = "score",
                 errors: list | None = None) -> np.ndarray:
    """Class probabilities of every item (NaN rows for unreadable images, whose (item, reason) go to
    `errors`), model in eval mode; a progress bar per batch unless `quiet`."""
    model.eval()
    positions = list(range(len(dataset)))
    batches = [positions[start:start + batch_size] for start in range(0, len(dataset), batch_size)]
    scores = np.full((len(dataset), model.head[-1].out_features), np.nan)
    with torch.inference_mode(), reused_memory(device):
        for pixels, indices, failed in progress(batch_loader(dataset, batches, workers, device), total=len(batches),
                                           desc=desc, unit="batch", quiet=quiet, leave=False):
            if errors is not None:
                errors.extend(failed)
            if pixels is None:
                continue
            with autocast(device, precision):
                logits = model(to_device(pixels, device)).float()
            scores[indices] = probabilities(logits, multilabel)
    return scores


def image_labels(dataset: PatchSamples, head_classes: list[str], what: str, head: str) -> tuple[np.ndarray, np.ndarray]:
    """(multi-hot targets, VOC ignore marks) of every image of a patch set, in the head's object classes
    (its column 0 is background): checked when the set is made, as its patches' labels are, since an image
    can hold a class the head does not know that no patch of it is labelled with."""
    source, names = dataset.source, head_classes[1:]
    targets = head_targets(source.targets(), source.classes, names, what, head)
    ignore = head_ignore(np.array([source.columns(i)["ignore"] for i in range(len(source.samples))]), source.classes,
                         names)
    return targets, ignore


def pooled_image_map(patch_scores: np.ndarray, dataset: PatchSamples, rows: np.ndarray,
                     labels: tuple[np.ndarray, np.ndarray]) -> float:
    """The VOC07 mAP of the images whose patches `rows` of `dataset` are (scored `patch_scores`), each image
    scored by pooling its patches (sum of P ** k, the default exponent) as tl evaluate scores it, with VOC's
    difficult-only classes left out (`labels`: image_labels): a multiscale finetune's validation on the
    measure its recipe reports."""
    images, pooled = pool_image_scores(patch_scores, dataset.images[rows])
    return mean_ap(per_class_ap(labels[0][images], pooled, "voc07", labels[1][images]))

