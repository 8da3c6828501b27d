"""The files tl keeps besides caches: one container (tensors + JSON metadata + a content checksum,
loaded with weights_only so nothing in it runs) for head files, finetuned model files and checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cache.manifest import decode_of
from pipeline import __version__
from pipeline.backbone_spec import layer_words
from pipeline.backbones import Backbone, as_cached, get_backbone, load_model, load_tensors, tap_model, weights_for_digest
from pipeline.errors import FinetuneError, HeadError
from pipeline.files import write_bytes
from pipeline.heads import HEAD_KINDS, Head
from pipeline.training import unreached

HEAD_FORMAT = "tl-head/1"
MODEL_FORMAT = "tl-model/1"
CHECKPOINT_FORMAT = "tl-checkpoint/2"  # /2: the optimizer's groups split into decayed and not decayed
CHECKSUM = "sha256"  # the payload key of a tl file's content checksum

# ---------------------------------------------------------------- the container


def payload_digest(payload) -> str:
    """SHA-256 over a payload's structure, tensors (dtype, shape, bytes) and plain values, in key order:
    a bit flipped anywhere in the file's content changes it."""
    digest = hashlib.sha256()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(repr(key).encode())
                visit(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                visit(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    visit(payload)
    return digest.hexdigest()


def standard_layout(value):
    """The payload with every tensor contiguous: models run in channels_last (hardware.prepare_module),
    but the files hold the layout any torch code expects of a state dict."""
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, dict):  # a state dict's OrderedDict keeps its type and its version _metadata
        converted = type(value)((key, standard_layout(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            converted._metadata = value._metadata
        return converted
    if type(value) in (list, tuple):
        return type(value)(standard_layout(item) for item in value)
    return value


def write_payload(payload: dict, path: Path, what: str, follow: bool = True) -> None:
    """A tl file (head, model, checkpoint) written atomically with its content checksum; a full disk
    or a folder as `path` is one line, and no temporary file stays behind."""
    buffer = io.BytesIO()
    payload = standard_layout(payload)
    # serialised in memory, written with plain file I/O: torch.save reports a full disk as an opaque
    # RuntimeError ("unexpected pos"), a plain write as ENOSPC/EFBIG
    torch.save({**payload, CHECKSUM: payload_digest(payload)}, buffer)
    write_bytes(path, buffer.getbuffer(), what, follow=follow)


def read_payload(path: Path, kind: str, remedy: str, error=HeadError, keys: tuple[str, ...] = (),
                 require_checksum: bool = False) -> tuple[dict, dict]:
    """(payload, its JSON metadata) of a tl file (head, model, checkpoint): tensors and plain data only, loaded
    with weights_only, so nothing in it is executed. A missing, foreign or folder path, or a file without `keys`
    or whose checksum does not match, is a one-line `error` naming the `kind` of file and the `remedy`."""
    path = Path(path)
    if path.is_dir():  # a sweep's folder holds its best head; a cache's none ('pass the file inside it' misled)
        best = path / "best.pt" if kind == "head file" else None
        raise error(f"{kind} {path} is a folder; " + (f"pass {best}, a sweep's best head" if best and best.is_file() else remedy))
    if not path.is_file():
        raise error(f"{kind} {path} does not exist; {remedy}")
    try:
        payload = load_tensors(path)
        metadata = json.loads(payload["metadata"])
        for key in keys:
            payload[key]
    except Exception:  # any unpickling, JSON or missing-key failure means the same thing to the user
        raise error(f"{path} is not a tl {kind}; {remedy}") from None
    recorded = payload.pop(CHECKSUM, None)
    if recorded is None and require_checksum:
        raise error(f"{kind} {path} was written by a tl without content checksums; {remedy}")
    if recorded is not None and recorded != payload_digest(payload):
        raise error(f"{kind} {path} is damaged (its checksum does not match its content); {remedy}")
    return payload, metadata


# ---------------------------------------------------------------- head files


def save_head(head: Head, path: Path, metadata: dict, follow: bool = True) -> None:
    """One file: the head's tensors and a JSON string (classes, layer, cache key, hyperparameters...)."""
    document = {"format": HEAD_FORMAT, "kind": head.kind, "tl_version": __version__,
                "hyperparameters": head.hyperparameters(), "state": head.state(), **metadata}
    write_payload({"metadata": json.dumps(document, allow_nan=False), "tensors": head.tensors()}, Path(path),
                  "head file", follow)


def load_head(path: Path):
    """(head, metadata) from a file written by `save_head`; nothing in the file is executed."""
    payload, metadata = read_payload(path, "head file", "train one with tl fit-head", keys=("tensors",))
    return head_from_payload(metadata, payload["tensors"], path)


def head_from_payload(metadata, tensors: dict, path, module_state: bool = False) -> tuple[Head, dict]:
    """(head, metadata) from a head file's two parts, wherever they were stored: its own `tensors`, or
    with `module_state` the state dict of its module (as a model file keeps it)."""
    if isinstance(metadata, dict) and metadata.get("format") == MODEL_FORMAT:
        raise HeadError(f"{path} is a model file of tl finetune, not a head file; evaluate, predict and export take it "
                        "as --model")
    if not isinstance(metadata, dict) or metadata.get("format") != HEAD_FORMAT \
            or metadata.get("kind") not in HEAD_KINDS:
        raise HeadError(f"{path} is not a {HEAD_FORMAT} head file; train one with tl fit-head")
    try:
        kind = HEAD_KINDS[metadata["kind"]]
        rebuild = kind.from_module if module_state else kind.from_saved
        head = rebuild(tensors, metadata["hyperparameters"], metadata["state"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise HeadError(f"{path} is a damaged head file ({type(exc).__name__}: {exc}); train it again") from None
    return head, metadata


def head_backbone(codes_key: dict, weights_path: str | None, head: str):
    """(backbone entry, weights) that made the codes of `codes_key`: the weights found again from their
    recorded digest; refused when this tl preprocesses images otherwise than when `head` was trained."""
    backbone = get_backbone(codes_key["backbone"])
    if backbone.preprocessing(decode_of(codes_key["preprocessing"])) != codes_key["preprocessing"]:
        raise HeadError(f"{backbone.name}'s preprocessing in this tl differs from the one {head} was trained "
                        "with; re-extract the cache and refit the head")
    return backbone, weights_for_digest(backbone, codes_key["weights"], weights_path)


# ---------------------------------------------------------------- finetuned models


class FinetuneModel(nn.Module):
    """pixels -> logits: the frozen-or-not backbone cut at the head's tap, then the head's layers.

    `eval_modules` stay in eval mode even in `train()`: every layer before the first trainable one, so
    frozen BatchNorm statistics never move and frozen dropout stays off, as in stage one; and, unless
    BatchNorm statistics are trained, every BatchNorm layer (its scale and shift still learn).
    """

    def __init__(self, features: nn.Module, tap: str, head: nn.Module, input_size: int = 224,
                 codes_dtype: str | None = None):
        super().__init__()
        self.features = features
        self.tap = tap
        self.head = head
        self.input_size = input_size  # the side of the square crops it takes
        self.codes_dtype = codes_dtype  # of the head's cache: its codes are rounded as it held them (see forward)
        self.eval_modules: list[nn.Module] = []
        self.held_parameters: set[str] = set()  # see freeze
        self.unreached_parameters: set[str] = set()  # see freeze

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        codes = self.features(pixels)[self.tap]  # as the head saw them: the epoch-0 model is the head on its cache
        return self.head(as_cached(codes, self.codes_dtype))

    def train(self, mode: bool = True) -> "FinetuneModel":
        super().train(mode)
        for module in self.eval_modules:
            module.eval()
        return self


def build_model(head_metadata: dict, head, weights_path: str | None) -> tuple[FinetuneModel, Backbone, list[str]]:
    """The model of a head: its backbone (weights found again from the recorded digest) up to its tap,
    and its layers. Returns the model, the backbone entry and the backbone's ordered conv layers."""
    backbone, weights = head_backbone(head_metadata["codes_key"], weights_path, "the head")
    full = load_model(backbone, weights)
    features = tap_model(full, backbone, [head_metadata["layer"]])
    model = FinetuneModel(features, head_metadata["layer"], head.logits_module(), backbone.input_size,
                          head_metadata.get("codes_dtype"))  # absent from heads of an earlier tl
    return model, backbone, _conv_layers(backbone, full, features)


def _conv_layers(backbone: Backbone, full: nn.Module, features: nn.Module) -> list[str]:
    """The conv layers of `full` cut to `features`, input to output: a family's own cut (timm) lists them
    itself; of the others, those the cut up to the tap holds (an efficientnet block12 head has none of
    the later blocks)."""
    convs = backbone.conv_layers(features.extractor if backbone.make_taps is not None else full)
    kept = {name for name, _ in features.extractor.named_modules()}
    return [name for name in convs if name in kept]


def tap_conv_layers(backbone: Backbone, tap: str) -> tuple[list[str], str]:
    """The layers --unfreeze counts before `tap` and what they are in words (see check_unfreeze), of the
    architecture built on the meta device (no memory, no weights, well under a second even for vgg16): tl
    run checks --unfreeze before any step, not after hours of extraction."""
    with torch.device("meta"):
        full = backbone.build()
    features = tap_model(full, backbone, [tap])
    convs = _conv_layers(backbone, full, features)
    return convs, layer_words(features.extractor, convs)


def check_unfreeze(unfreeze: int | str, convs: list[str], words: str = "conv layers") -> int:
    """--unfreeze as the count of `convs` it trains: `all` is every one of them."""
    if unfreeze == "all":
        return len(convs)
    if not isinstance(unfreeze, int) or unfreeze < 0:
        raise FinetuneError(f"--unfreeze must be 0 or more, or all, got {unfreeze}")
    if unfreeze > len(convs):
        raise FinetuneError(f"--unfreeze {unfreeze} is more than the {len(convs)} {words} of this backbone "
                            f"before the tap; pass --unfreeze {len(convs)} or less")
    return unfreeze


def freeze(model: FinetuneModel, convs: list[str], unfreeze: int | str, bn_stats: bool = False) -> dict:
    """Train the head and, with N ≥ 1, the last N conv layers and everything after them up to the tap;
    every earlier parameter gets requires_grad=False and its modules stay in eval mode. BatchNorm layers
    keep their ImageNet statistics unless `bn_stats` (as Keras's transfer-learning guide advises: batch
    statistics of small fine-tuning batches would replace them and wreck the codes the head knows)."""
    unfreeze = check_unfreeze(unfreeze, convs, layer_words(model.features.extractor, convs))
    modules = list(model.features.named_modules())
    first = len(modules)
    if unfreeze:
        target = "extractor." + convs[-unfreeze]
        first = next(i for i, (name, _) in enumerate(modules) if name == target)
    trainable_names = {name for name, _ in modules[first:]}
    # every module before the first trainable layer but those holding one (eval() recurses): not leaves
    # only, as a norm + act module (timm's BatchNormAct2d) has children and statistics of its own
    frozen = [module for name, module in modules[:first] if not _holds(name, trainable_names)]
    model.eval_modules = frozen + [module for _, module in modules[first:]
                                   if not bn_stats and isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for name, parameter in model.features.named_parameters():
        owner = name.rsplit(".", 1)[0]
        # a module's own parameters beside its children train when it holds a trainable one, as its eval mode
        # follows them: ConvNeXt's layer scale `gamma` (applied after the block's last conv) stayed frozen
        # under the layers it scales
        parameter.requires_grad = owner in trainable_names or _holds(owner, trainable_names)
    for parameter in model.head.parameters():
        parameter.requires_grad = True
    if unfreeze < len(convs) and any(p.requires_grad for p in model.features.extractor.parameters(recurse=False)):
        # the network's own (a ViT's class token and position embedding) train when no frozen layer takes them in,
        # as a probe with those layers' outputs cut finds: a ViT's feed its first block; CaiT's class token joins
        # only its class-attention blocks (and trained only with every layer)
        cut = [module.register_forward_hook(lambda module, inputs, output: torch.utils._pytree.tree_map_only(
            torch.Tensor, torch.Tensor.detach, output)) for module in frozen]
        try:
            for name in unreached(model, "features", model.input_size):
                model.features.get_parameter(name).requires_grad &= name.rsplit(".", 1)[0] != "extractor"
        finally:
            for hook in cut:
                hook.remove()
    # not trained, not listed: torchrun's DDP stopped at the second step on them
    model.unreached_parameters = set(unreached(model, "features", model.input_size))
    for name in model.unreached_parameters:
        model.features.get_parameter(name).requires_grad = False
    order, labels = [name for name, _ in modules], {}
    model.held_parameters = set()
    for name, parameter in model.features.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if parameter.requires_grad and owner not in trainable_names:  # a checkpoint of an earlier tl lacks them
            model.held_parameters.add(name)
        if parameter.requires_grad:  # listed by module; a holder's own parameter by its name (cls_token, ...gamma)
            labels.setdefault((owner if owner in trainable_names else name).removeprefix("extractor."),
                              order.index(owner))
    layers = sorted(labels, key=labels.get)
    return {"parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "backbone_layers": layers, "conv_layers": convs[len(convs) - unfreeze:] if unfreeze else []}


def resumable_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, model: FinetuneModel, optimizer_of) -> dict:
    """A checkpoint's optimizer state for `optimizer`, which `optimizer_of(model)` builds over `model`. An earlier
    tl's groups, refused by load_state_dict as another optimizer's, lack the holders' own parameters (freeze: they
    join without momentum yet) or hold those no gradient reaches (never stepped, no state); the state moves
    parameter by parameter, so a stopped ConvNeXt or ViT run resumes instead of starting over."""
    numbered = optimizer.state_dict()["param_groups"]  # its parameters numbered across the groups, in order
    sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sizes == [len(group["params"]) for group in numbered]:
        return saved  # this tl's layout
    idle = [model.features.get_parameter(name) for name in model.unreached_parameters]
    try:
        for parameter in idle:  # trainable, as an earlier tl had them
            parameter.requires_grad = True
        reaching = [group["params"] for group in optimizer_of(model).param_groups]
    finally:
        for parameter in idle:
            parameter.requires_grad = False
    held = {id(p) for name, p in model.features.named_parameters() if name in model.held_parameters}
    current = [group["params"] for group in optimizer.param_groups]
    layouts = [[[p for p in group if id(p) not in without] for group in groups]
               for groups, without in ((reaching, ()), (reaching, held), (current, held))]
    earlier = next((kept for kept in ([group for group in layout if group] for layout in layouts)  # empty: dropped
                    if [len(group) for group in kept] == sizes), None)
    if earlier is None:
        return saved  # another layout: load_state_dict refuses it
    where = {id(p): (number, kept) for kept, group in zip(saved["param_groups"], earlier)
             for number, p in zip(kept["params"], group)}  # a parameter's number and group in the checkpoint
    state, groups = {}, []
    for group, new in zip(current, numbered):
        found = [(where[id(p)], number) for p, number in zip(group, new["params"]) if id(p) in where]
        state.update({number: saved["state"][old] for (old, _), number in found if old in saved["state"]})
        groups.append({**(found[0][0][1] if found else new), "params": new["params"]})
    return {"state": state, "param_groups": groups}


def _holds(name: str, names: set[str]) -> bool:
    """Whether the module called `name` contains a module of `names` ("" is the root: it holds them all)."""
    return any(not name or other.startswith(name + ".") for other in names)


def checkpoint_paths(out: Path) -> tuple[Path, Path]:
    """(last, best) checkpoints beside the model file."""
    out = Path(out)
    return out.with_name(out.stem + ".last.ckpt"), out.with_name(out.stem + ".best.ckpt")


def _recorded(key: str, value):
    """A setting as the model file keeps it: paths as text, the data absolute so that tl export finds
    the training images from any working folder."""
    if key in ("data", "val_data") and value:
        return os.path.abspath(value)
    return str(value) if isinstance(value, Path) else value


def save_model(path: Path, model: FinetuneModel, head_metadata: dict, trainable: dict, history: list[dict],
               settings: dict) -> None:
    """The model file: every tensor, and JSON metadata enough to rebuild it without running code."""
    head_part = {key: head_metadata[key] for key in ("format", "kind", "tl_version", "hyperparameters", "state",
                                                    "classes", "layer", "width", "codes_key")}
    document = {"format": MODEL_FORMAT, "tl_version": __version__, "head": head_part,
                "classes": head_metadata["classes"], "layer": head_metadata["layer"],
                "codes_key": head_metadata["codes_key"], "codes_dtype": head_metadata.get("codes_dtype"),
                "unfreeze": settings["unfreeze"], "trainable": trainable,
                "history": history, "settings": {k: _recorded(k, v) for k, v in settings.items()}}
    head_tensors = {name: tensor.detach().cpu() for name, tensor in model.head.state_dict().items()}
    write_payload({"metadata": json.dumps(document), "tensors": model.state_dict(), "head_tensors": head_tensors},
                  Path(path), "model file")


def load_model_file(path: Path, weights_path: str | None = None) -> tuple[FinetuneModel, dict]:
    """(model in eval mode, metadata) from a file written by `save_model`; nothing in it is executed."""
    path = Path(path)
    payload, metadata = read_payload(path, "model file", "train one with tl finetune", FinetuneError)
    if isinstance(metadata, dict) and metadata.get("format") == HEAD_FORMAT:
        raise FinetuneError(f"{path} is a head file of tl fit-head, not a model file; make a model of it with tl "
                            f"finetune --head {path} (--epochs 0 keeps the head as it is)")
    if not isinstance(metadata, dict) or metadata.get("format") != MODEL_FORMAT:
        raise FinetuneError(f"{path} is not a {MODEL_FORMAT} file; train one with tl finetune")
    try:
        head_part, module_state = metadata["head"], payload["head_tensors"]
    except KeyError:
        raise FinetuneError(f"{path} is not a {MODEL_FORMAT} file; train one with tl finetune") from None
    head, _ = head_from_payload(head_part, module_state, path, module_state=True)
    key = metadata["codes_key"]
    backbone = get_backbone(key["backbone"])
    # every weight comes from the file: build the architecture only (seeded, nothing downloaded)
    full = load_model(backbone, weights_for_digest(backbone, "random-init:seed=0"))
    model = FinetuneModel(tap_model(full, backbone, [metadata["layer"]]), metadata["layer"], head.logits_module(),
                          backbone.input_size, metadata.get("codes_dtype"))
    try:
        model.load_state_dict(payload["tensors"])
    except RuntimeError as exc:
        raise FinetuneError(f"{path} does not fit its own description ({str(exc).splitlines()[0]}); "
                            "train it again") from None
    return model.eval(), metadata


def save_checkpoint(path: Path, model, optimizer, schedule, scaler, epoch: int, history: list[dict], best,
                    identity: dict) -> None:
    """Everything a resumed run needs, and the `identity` of the run it may resume (see load_checkpoint)."""
    payload = {
        "metadata": json.dumps({"format": CHECKPOINT_FORMAT, "epoch": epoch, "history": history,
                                "best_loss": best[0] if math.isfinite(best[0]) else None, "best_epoch": best[1],
                                "identity": identity, "tl_version": __version__}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),  # empty unless float16 loss scaling is on
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    write_payload(payload, path, "checkpoint")


def load_checkpoint(path: Path, identity: dict) -> dict:
    """A checkpoint's tensors and progress, refused unless it was written by a run of this `identity`."""
    payload, metadata = read_payload(path, "checkpoint", "delete it and start over", FinetuneError,
                                     require_checksum=True)
    found = metadata.get("identity") or {}
    # a field an earlier tl did not record is not held against its checkpoints
    differences = [name for name in identity if name in found and found[name] != identity[name]]
    if metadata.get("format") != CHECKPOINT_FORMAT or not found or differences:
        raise FinetuneError(f"checkpoint {path} does not match this run ({', '.join(differences) or 'format'} "
                            "differ); resume with the same head, data, --unfreeze and --seed, "
                            "or pass --overwrite to start over")
    best_loss = metadata["best_loss"]
    return {**payload, "epoch": metadata["epoch"], "history": metadata["history"],
            "best_loss": math.inf if best_loss is None else best_loss, "best_epoch": metadata["best_epoch"]}
