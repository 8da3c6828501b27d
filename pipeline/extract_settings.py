"""What an extract's settings decide before any image is read: `tl extract`'s config, the shard size, and
the part of the cache key the settings alone give, by which `tl run` tells ahead that a cache at a step's
out is of other settings (pipeline.run_records.stop_ahead) without importing the extract stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cache.shard_names import holds_shards
from cache.writer import other_settings
from pipeline.backbones import Backbone, get_backbone
from pipeline.config import csv_list
from pipeline.decoding import DEFAULT_DECODE
from pipeline.errors import TLError
from pipeline.formats import DEFAULT_CLASSES, DEFAULT_FORMAT
from pipeline.multiscale import TRAINING_SPLITS, PatchSettings

ON_ERROR = ("skip", "fail")
SHARD_ROWS, PATCH_SHARD_ROWS = 4096, 32  # images per shard by default; a multiscale image gives hundreds of rows


@dataclass
class ExtractConfig:
    """What `run_extract` reads and writes: the images of `data` (read as `format`, split `split`) through
    `backbone` with `weights`, codes of `layers` (empty: the backbone's default tap) stored as `dtype` in
    shards of `shard_rows` images under `out`. Each field is the `tl extract` option of the same name;
    `patches` gathers the --multiscale settings.
    """

    data: Path
    out: Path
    format: str = DEFAULT_FORMAT
    split: str = "train"
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    layers: tuple[str, ...] = ()  # empty: the backbone's default tap
    dtype: str = "float16"
    shard_rows: int | None = None  # images per shard; None: SHARD_ROWS, or PATCH_SHARD_ROWS with --multiscale
    compression: str = "none"
    batch_size: int = 64
    workers: int | None = None  # None: pipeline.hardware.default_workers
    device: str = "auto"
    precision: str = "auto"
    samples_per_class: int | None = None
    seed: int = 0
    on_error: str = "skip"
    decode: str = DEFAULT_DECODE  # how images become centre crops: fast (reduced-scale JPEG decoding) or exact
    device_decode: str = "auto"  # JPEGs decoded on the device: auto (on CUDA), on, off
    overwrite: bool = False
    download: bool = False
    quiet: bool = False
    classes: str = DEFAULT_CLASSES  # voc sources: voc (the 20), auto (from the annotations) or comma-separated names
    label_key: str | None = None  # webdataset: the label file of a sample, cls, txt, json or json:FIELD (None: cls)
    multiscale: bool = False  # Oquab patches of every image instead of one centre crop
    patches: PatchSettings = field(default_factory=PatchSettings)

    @classmethod
    def of_options(cls, format_, layers, scales, patch_overlap, box_overlap, background_fraction, **options):
        """The config `tl extract`'s options give; tl run builds a step's the same way to look at its out ahead."""
        return cls(format=format_, layers=csv_list(layers), **options,
                   patches=PatchSettings.of_options(scales, patch_overlap, box_overlap, background_fraction))


def shard_size(config: ExtractConfig) -> int:
    """Images per shard: a multiscale image yields hundreds of rows, so its shards hold fewer images."""
    return config.shard_rows if config.shard_rows is not None else (PATCH_SHARD_ROWS if config.multiscale else SHARD_ROWS)


def settings_key(config: ExtractConfig, backbone: Backbone, taps: list[str]) -> dict:
    """The part of the cache key that the settings alone decide, no data listed and no weights read."""
    training = config.split in TRAINING_SPLITS
    return {
        "backbone": backbone.name,
        "taps": sorted(taps),
        "preprocessing": backbone.preprocessing(config.decode),
        "dataset": {
            "split": config.split,
            "samples_per_class": config.samples_per_class or None,  # 0 and None: every image
            "subset_seed": config.seed if config.samples_per_class else None,
            "background_fraction": config.patches.background_fraction if config.multiscale and training else None,
            "background_seed": config.seed if config.multiscale and training else None,
        },
        "layout": {"dtype": config.dtype, "shard_rows": shard_size(config)},
        "patches": config.patches.geometry() if config.multiscale else None,
    }


def settings_stop(config: ExtractConfig) -> str | None:
    """What the cache at --out holds that the extract refuses without --overwrite, as far as the settings
    alone tell (another backbone, layers, dtype, ...): tl run stops before any step there. None: nothing
    known ahead (weights, precision and the data's classes are compared when the step runs)."""
    from cache.manifest import RecordDamage, key_differences, load_manifest

    out = Path(config.out)
    try:
        try:
            existing = load_manifest(out)
        except RecordDamage:  # its header read alone, as the writer does: its shard files are its finished shards
            existing = load_manifest(out, records=False)
        backbone = get_backbone(config.backbone)
        known = settings_key(config, backbone, backbone.resolve_taps(list(config.layers) or [backbone.default_tap]))
    except TLError:  # no cache there, or one the step itself says is damaged; a bad setting the step refuses
        return None
    held = {**{name: existing.key.get(name) for name in known},  # the dataset's settings, not its classes
            "dataset": {part: (existing.key.get("dataset") or {}).get(part) for part in known["dataset"]}}
    lines = key_differences(held, known)
    return other_settings(lines) if lines and (existing.shards or holds_shards(out)) else None
