"""Registries are the single source of the CLI's choices, help texts and defaults: backbones, head kinds,
data formats and decoding modes are registered once, a duplicate name is refused, a new data format is
one module, and `tl` itself starts without importing torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import click
import numpy as np
import pytest
from PIL import Image

import cli
from pipeline import decoding, formats, heads
from pipeline.datasets import FORMATS, Source, register_format
from pipeline.errors import DataError, HeadError, TLError
from tests.conftest import REPO, blobs, write_code_cache


def _params(command: str) -> dict[str, click.Parameter]:
    return {param.name: param for param in cli.tl.commands[command].params}


def test_tl_starts_lists_commands_and_describes_a_cache_without_importing_torch(tmp_path):
    codes, targets = blobs(0, n=40, classes=2, width=8)
    write_code_cache(tmp_path / "cache", codes, targets, ["ant", "bee"])
    script = ("import sys, cli\n"
              "for args in (['--help'], ['info', sys.argv[1]]):\n"
              "    try:\n"
              "        cli.main(args)\n"
              "    except SystemExit:\n"
              "        pass\n"
              "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], cwd=REPO, capture_output=True,
                          text=True)
    assert "Usage: tl" in done.stdout and "classes    2: ant, bee" in done.stdout, done
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_choices_are_the_registries_names():
    assert _params("extract")["format_"].type.choices == tuple(formats.format_names())
    assert _params("evaluate")["format_"].type.choices == tuple(formats.format_names())
    assert _params("finetune")["format_"].type.choices == tuple(formats.format_names())
    assert _params("extract")["decode"].type.choices == tuple(decoding.DECODE_MODES)
    assert _params("fit-head")["head"].type.choices == tuple(heads.HEAD_KINDS)
    assert set(formats.format_names()) == {"imagefolder", "csv", "cifar10", "gtsrb", "voc", "webdataset"}
    assert formats.format_names()[0] == formats.DEFAULT_FORMAT


def test_a_head_kind_registered_once_appears_in_the_cli_with_its_help(monkeypatch, run_tl):
    class MeanHead(heads.LinearHead):
        kind = "nearest-mean"
        help = "a probe kind for this test"

    monkeypatch.setitem(heads.HEAD_KINDS, MeanHead.kind, MeanHead)
    assert "nearest-mean" in _params("fit-head")["head"].type.choices
    shown = run_tl("fit-head", "--help")
    assert "nearest-mean: a probe kind for this test" in " ".join(shown.out.split())


def test_registering_a_second_entry_of_one_name_is_refused():
    class AnotherLogReg(heads.LogRegHead):
        pass

    with pytest.raises(HeadError, match="already registered"):
        heads.register_head(AnotherLogReg)

    class AnotherVoc(Source):
        format = "voc"

    with pytest.raises(DataError, match="already registered"):
        register_format(AnotherVoc)

    class AnotherFast(decoding.FastCrop):
        pass

    with pytest.raises(TLError, match="already registered"):
        decoding.register_decode(AnotherFast)
    from pipeline.backbones import get_backbone, register

    with pytest.raises(TLError):
        register(get_backbone("alexnet"))


FORMAT_MODULE = '''"""A probe data format: every .npy file of DATA is one grey image, labelled by its name's prefix."""

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets import Sample, Source, register_format


@register_format
class NpyFolder(Source):
    format = "npy-probe"
    help = "grey .npy arrays named LABEL_N.npy"

    @classmethod
    def open(cls, data: Path, split: str, download: bool, classes: str) -> "NpyFolder":
        files = sorted(Path(data).glob("*.npy"))
        names = sorted({f.stem.split("_")[0] for f in files})
        return cls(names, [Sample(f.name, names.index(f.stem.split("_")[0]), str(f), "") for f in files])

    def read_image(self, index, draft=None):
        return Image.fromarray(np.load(self.samples[index].location)).convert("RGB")
'''


def test_a_new_data_format_is_one_module_found_by_open_source_and_the_cli(tmp_path, monkeypatch, run_tl):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "npy_probe.py").write_text(FORMAT_MODULE)
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(plugins)])
    data = tmp_path / "arrays"
    data.mkdir()
    for number, label in enumerate(["ant", "bee", "ant"]):
        np.save(data / f"{label}_{number}.npy", np.full((8, 8), 40 * number, np.uint8))
    try:
        source = formats.open_source("npy-probe", data)
        assert source.classes == ["ant", "bee"] and [s.target for s in source.samples] == [0, 0, 1]
        assert source.read_image(2).size == (8, 8)
        assert "npy-probe" in _params("extract")["format_"].type.choices
        assert "npy-probe: grey .npy arrays" in " ".join(run_tl("extract", "--help").out.split())
    finally:
        FORMATS.pop("npy-probe", None)
        sys.modules.pop("pipeline.formats.npy_probe", None)


COMMAND_CONFIGS = {
    "extract": ("pipeline.extract:ExtractConfig", "pipeline.multiscale:PatchSettings"),
    "fit-head": ("pipeline.fit_head:FitHeadConfig", "pipeline.training:TrainingOptions"),
    "evaluate": ("pipeline.evaluate:EvaluateConfig",),
    "predict": ("pipeline.predict:PredictConfig",),
    "finetune": ("pipeline.finetune:FinetuneConfig",),
    "quickstart": ("pipeline.quickstart:QuickstartConfig",),
}


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_default_is_declared_once_in_the_stage_config(command):
    """An option named like a config field has no default of its own: it reads the field's."""
    fields = {}
    for config in COMMAND_CONFIGS[command]:
        for field in dataclasses.fields(cli._attribute(config)):
            fields.setdefault(field.name, field)
    own = {"quiet"} if command == "fit-head" else set()  # TrainingOptions.quiet is the library's, not the CLI's
    checked = 0
    for param in cli.tl.commands[command].params:
        name = param.name.rstrip("_")
        if not isinstance(param, click.Option) or name not in fields or name in own:
            continue
        if param.required:  # a required option has no default at all: leaving it out is click's one line
            assert fields[name].default is dataclasses.MISSING and param.default in (None, cli.UNSET), (command, name)
            continue
        assert isinstance(param.default, cli.StageDefault), f"tl {command} --{name} declares its own default"
        field = fields[name]
        expected = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        if isinstance(expected, tuple):
            expected = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in expected)
        got = param.default()
        assert got == expected or (expected is None and got in (None, False)), (command, name, got, expected)
        checked += 1
    assert checked >= 4


def test_a_changed_config_default_reaches_the_cli(monkeypatch, run_tl):
    from pipeline.evaluate import EvaluateConfig

    field = next(f for f in dataclasses.fields(EvaluateConfig) if f.name == "top_k")
    monkeypatch.setattr(field, "default", 7)
    assert _params("evaluate")["top_k"].get_default(click.Context(cli.tl.commands["evaluate"])) == 7
    assert "[default: 7; x>=1]" in " ".join(run_tl("evaluate", "--help").out.split())


def test_help_shows_numbers_zero_and_flags_defaults(run_tl):
    text = " ".join(run_tl("finetune", "--help").out.split())
    assert "--seed INTEGER RANGE [default: 0; 0<=x<=4294967295]" in text
    assert "[default: flip]" in text and "[default: no-early-stop]" in text
    assert "--lr FLOAT Learning rate of the head (small: it starts trained). [default: 0.0001]" in text


def test_a_fast_crop_is_what_the_fast_mode_builds():
    crop = decoding.crop_decoder("fast", 256, 224)
    assert isinstance(crop, decoding.FastCrop) and crop(Image.new("RGB", (500, 375))).shape == (3, 224, 224)
    with pytest.raises(TLError, match="valid: "):
        decoding.crop_decoder("fastest", 256, 224)
