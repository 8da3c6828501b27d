"""The voc format: a PASCAL VOC devkit year, multi-label targets from the annotations, difficult-only
classes ignored in their AP, boxes validated and clipped for the multiscale patch labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets import DECODE_ERRORS, Annotation, Sample, Source, file_stamp, register_format, require_dir
from pipeline.errors import DataError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


@register_format
class VocSource(Source):
    """The PASCAL VOC devkit layout: Annotations/ID.xml, JPEGImages/ID.jpg, ImageSets/Main/SPLIT.txt.

    One sample per image with a multi-hot target of the classes it shows (not counting objects marked
    difficult); `ignore` marks classes it shows only as difficult objects, left out of their AP.
    `classes`: "voc" (the 20 VOC classes), "auto" (the names found in the split's annotations), or a
    comma-separated list.
    """

    format = "voc"
    takes_classes = True
    help = 'a PASCAL VOC devkit year: multi-label images with boxes (--classes)'
    target_kind = "multi-hot"
    boxes = True

    @classmethod
    def open(cls, data: Path, split: str, download: bool, classes: str) -> "VocSource":
        return cls(data, split, classes)

    def __init__(self, root: Path, split: str, classes: str = "voc"):
        require_dir(root, "a VOC devkit year (VOCdevkit/VOC2007)")
        if (root / "VOC2007").is_dir() and not (root / "Annotations").is_dir():
            root = root / "VOC2007"
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            found = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
            if not found:  # 'splits here: none' said neither what was wrong nor what to pass
                raise DataError(f"no split file {split_file}: {root} holds no ImageSets/Main/SPLIT.txt; pass --data "
                                "with a VOC devkit year (VOCdevkit/VOC2007)")
            raise DataError(f"no split file {split_file}; pass --split with one of the splits here: {', '.join(found)}")
        try:
            ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise DataError(f"split file {split_file} is not UTF-8 text; save it as UTF-8") from None
        if not ids:
            raise DataError(f"split file {split_file} lists no images")
        parsed = [self._parse(root, image_id) for image_id in ids]
        unusable = sum(skipped for *_, skipped in parsed)
        parsed = [fields[:4] for fields in parsed]
        names = self._class_names(classes, parsed, split_file)
        index = {name: i for i, name in enumerate(names)}
        self.annotations: list[Annotation] = []
        self._ignore: list[np.ndarray] = []
        samples, clipped = [], 0
        for image_id, (path, width, height, objects) in zip(ids, parsed):
            boxes, labels, difficult = [], [], []
            for name, box, is_difficult in objects:
                if name not in index:
                    raise DataError(f"{root / 'Annotations' / (image_id + '.xml')} has class '{name}', not among "
                                    f"the {len(names)} classes; pass --classes auto to take the annotations' names")
                x0, y0, x1, y1 = box
                clipped_box = (min(max(x0, 0), width - 1), min(max(y0, 0), height - 1),
                               min(max(x1, 0), width - 1), min(max(y1, 0), height - 1))
                clipped += clipped_box != box
                boxes.append(clipped_box)
                labels.append(index[name])
                difficult.append(is_difficult)
            annotation = Annotation(width, height, np.array(boxes, np.float64).reshape(-1, 4),
                                    np.array(labels, np.int64), np.array(difficult, bool))
            present = np.zeros(len(names), np.int64)
            present[annotation.labels[~annotation.difficult]] = 1
            shown = np.zeros(len(names), np.int64)
            shown[annotation.labels] = 1
            self.annotations.append(annotation)
            self._ignore.append((shown & (1 - present)).astype(np.int8))
            samples.append(Sample(image_id, tuple(int(v) for v in present), str(path), file_stamp(path)))
        super().__init__(names, samples)
        if clipped:
            self.warnings.append(f"{clipped} boxes reached outside their image and were clipped to it")
        if unusable:
            self.warnings.append(f"{unusable} boxes were reversed, not finite or outside their image and were skipped")

    def columns(self, index: int) -> dict[str, np.ndarray]:
        return {"ignore": self._ignore[index]}

    def sample_inputs(self, index: int) -> bytes:
        """The image's id, classes and file stamp, and its boxes (they label the multiscale patches)."""
        annotation = self.annotations[index]
        boxes = f"{annotation.boxes.tolist()}{annotation.labels.tolist()}{annotation.difficult.tolist()}\n"
        return super().sample_inputs(index) + boxes.encode()

    def keep(self, indices) -> None:
        super().keep(indices)
        self.annotations = [self.annotations[i] for i in indices]
        self._ignore = [self._ignore[i] for i in indices]

    @staticmethod
    def _parse(root: Path, image_id: str):
        """(jpeg path, width, height, [(name, (x0, y0, x1, y1), difficult)], boxes skipped) of one annotation
        file; boxes that are reversed, not finite or wholly outside the image are skipped with their object."""
        import xml.etree.ElementTree as ElementTree

        xml_path = root / "Annotations" / f"{image_id}.xml"
        jpeg = root / "JPEGImages" / f"{image_id}.jpg"
        if not jpeg.is_file():
            raise DataError(f"the split file names {image_id} but {jpeg} is missing; restore it or remove the line")
        if not xml_path.is_file():
            raise DataError(f"the split file names {image_id} but {xml_path} is missing; restore it or remove the line")
        try:
            tree = ElementTree.parse(xml_path).getroot()
            objects = []
            for number, element in enumerate(tree.iter("object"), start=1):
                name = (element.findtext("name") or "").strip()
                bndbox = element.find("bndbox")
                missing = ("<name>" if not name else "<bndbox>" if bndbox is None else
                           next((f"<{k}>" for k in ("xmin", "ymin", "xmax", "ymax")
                                 if not (bndbox.findtext(k) or "").strip()), None))
                if missing:
                    raise DataError(f"{xml_path}: <object> {number} has no {missing}; fix the annotation file")
                # VOC boxes are 1-based inclusive pixel indices
                box = tuple(float(bndbox.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
                difficult = (element.findtext("difficult") or "0").strip() == "1"
                objects.append((name, box, difficult))
            size = tree.find("size")
            width = int(float(size.findtext("width"))) if size is not None and size.findtext("width") else 0
            height = int(float(size.findtext("height"))) if size is not None and size.findtext("height") else 0
        except (ElementTree.ParseError, TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"cannot read {xml_path}: {exc}; fix the annotation file") from None
        if width <= 0 or height <= 0:  # no usable <size>: the image itself knows
            try:
                with Image.open(jpeg) as image:
                    width, height = image.size
            except DECODE_ERRORS as exc:
                raise DataError(f"{xml_path} has no size and {jpeg} cannot be read: {exc}") from None
        usable = [(name, (x0, y0, x1, y1), difficult) for name, (x0, y0, x1, y1), difficult in objects
                  if all(math.isfinite(v) for v in (x0, y0, x1, y1)) and x0 <= x1 and y0 <= y1
                  and x1 >= 0 and y1 >= 0 and x0 <= width - 1 and y0 <= height - 1]
        return jpeg, width, height, usable, len(objects) - len(usable)

    @staticmethod
    def _class_names(classes: str, parsed: list, split_file: Path) -> list[str]:
        if classes == "voc":
            return list(VOC_CLASSES)
        if classes == "auto":
            names = sorted({name for _, _, _, objects in parsed for name, _, _ in objects})
            if not names:
                raise DataError(f"the annotations of {split_file} name no objects; nothing to learn classes from")
            return names
        names = [name.strip() for name in classes.split(",") if name.strip()]
        if len(set(names)) != len(names) or not names:
            raise DataError(f"--classes must be voc, auto, or distinct comma-separated names, got '{classes}'")
        return names
