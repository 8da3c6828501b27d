"""Mini-batch training in torch, shared by the heads and stage three: the optimizer (weight decay on
weights, never on biases or scales), the step schedule, the loss and output activation for single- and
multi-label targets, and the epoch loop of a torch head over streamed code rows.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.code_rows import CodeRows, validation_score
from pipeline.errors import HeadError, TLError, listed
from pipeline.hardware import pinned, resolve_device, to_device
from pipeline.progress import progress

OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = {"sgd": 0.05, "adam": 0.001}  # a torch head's learning rate when --lr is not given


class Standardize(nn.Module):
    """(x - mean) / scale, the scaler every head is fitted behind."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.mean) / self.scale


def output_activation(multilabel: bool) -> nn.Module:
    """logits -> probabilities: independent sigmoids for multi-hot targets, else softmax over classes."""
    return nn.Sigmoid() if multilabel else nn.Softmax(dim=1)


def probabilities(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    """output_activation of `logits` in float64, as a (rows, classes) array: float32's softmax or sigmoid is
    exactly 1.0 past a logit gap of 16.6 (float64's 36.7), and a confident model's scores would tie for AP."""
    return output_activation(multilabel)(logits.double()).cpu().numpy()


def best_standing(history: list[dict]) -> tuple[float, int | None]:
    """(score, epoch index) of the best validated epoch of a finetune's history, lower scores better: the highest
    image mAP where its points have one (a multiscale head's images, scored as evaluate scores them: the number the
    VOC recipe is judged by), else the lowest validation loss; (inf, None) before any validation."""
    best: tuple[float, int | None] = (math.inf, None)
    for index, point in enumerate(history):
        score = -point["val_image_map"] if "val_image_map" in point else point.get("val_loss", math.inf)
        if score < best[0]:  # a NaN mAP (no positive image yet) is never best
            best = (score, index)
    return best


def loss_for(multilabel: bool) -> nn.Module:
    """The training loss on logits that goes with `output_activation`."""
    return nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()


def check_optimizer(name: str, error) -> None:
    if name not in OPTIMIZERS:
        raise error(f"unknown --optimizer {name}; valid: {', '.join(OPTIMIZERS)}")


def decay_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Each parameter group split in two: weight matrices and kernels with `weight_decay` (or the group's own
    "weight_decay"), biases and per-channel scales (one dimension) without; empty halves dropped."""
    split = []
    for group in groups:
        for decayed in (True, False):
            params = [p for p in group["params"] if (p.ndim > 1) == decayed]
            if params:
                split.append({**group, "params": params,
                              "weight_decay": group.get("weight_decay", weight_decay) if decayed else 0.0})
    return split


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """A FinetuneModel's groups: the head at --lr, trainable backbone layers at --lr x --backbone-lr-scale.
    Embeddings held beside layers (a ViT's class token and position embedding, a Swin's relative position bias
    tables: not a layer's weights) are not decayed, as timm's recipes leave them."""
    groups = [{"params": list(model.head.parameters()), "lr": lr}]
    # layers, whose weights are decayed: modules whose children hold no parameters (an FX-traced conv of
    # efficientnet_lite keeps its padding as a child) and torch's attention (its projection is a child)
    leaves = {name for name, module in model.features.named_modules() if isinstance(module, nn.MultiheadAttention)
              or all(next(child.parameters(), None) is None for child in module.children())}
    trained = [(name.rsplit(".", 1)[0] in leaves, p) for name, p in model.features.named_parameters() if p.requires_grad]
    rate = lr * backbone_lr_scale
    for layers, extra in ((True, {}), (False, {"weight_decay": 0.0})):
        chosen = [p for of_layer, p in trained if (of_layer or p.ndim == 1) == layers]
        if chosen:
            groups.append({"params": chosen, "lr": rate, **extra})
    return groups


def unreached(model: nn.Module, within: str, side: int, devices=("meta", None)) -> list[str]:
    """The trainable parameters of `model.<within>` (their names there) that no gradient of `model`'s output
    reaches: one backward pass of a blank (1, 3, side, side) batch in eval mode, first on the meta device (no
    memory, no arithmetic: milliseconds where the real pass takes seconds), else, where an operation of the
    model does not run there, on the parameters' own device."""
    trained = [name for name, parameter in model.get_submodule(within).named_parameters() if parameter.requires_grad]
    if not trained:
        return []
    mode = model.training
    model.eval()
    try:
        for device in devices[:-1]:
            try:
                return _unreached_on(model, within, trained, side, device)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):  # no meta kernel: the real pass
                continue
        return _unreached_on(model, within, trained, side, devices[-1])  # its error is the model's own
    finally:
        model.train(mode)


def _unreached_on(model: nn.Module, within: str, trained: list[str], side: int, device) -> list[str]:
    tensors = dict(model.named_parameters())
    if device is not None:  # stand-ins of the parameters and buffers, as functional_call takes them
        tensors = {name: torch.empty_like(tensor, device=device).requires_grad_(tensor.requires_grad)
                   for name, tensor in tensors.items()}
        tensors.update({name: torch.empty_like(buffer, device=device) for name, buffer in model.named_buffers()})
    pixels = torch.zeros(1, 3, side, side, device=device or next(model.parameters()).device)
    output = model(pixels) if device is None else torch.func.functional_call(model, tensors, (pixels,), strict=False)
    wanted = [tensors[f"{within}.{name}"] for name in trained]
    reached = torch.autograd.grad(output.float().sum(), wanted, allow_unused=True)
    return [name for name, gradient in zip(trained, reached) if gradient is None]


def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float, weight_decay: float,
                   error=HeadError) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over `groups` (each with its own "lr"), decay as in `decay_groups`."""
    check_optimizer(name, error)
    groups = decay_groups(groups, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.Adam(groups, lr=lr)


def check_rates(lr: float | None, momentum: float, weight_decay: float, error: type[TLError]) -> None:
    """Finite rates: an infinite momentum ended in a traceback writing the head, an infinite lr or decay in
    a diverged loss that blamed the cache."""
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise error(f"--lr must be a positive finite number, got {lr}")
    if not all(value >= 0 and math.isfinite(value) for value in (momentum, weight_decay)):
        raise error(f"--momentum and --weight-decay must be finite and 0 or more, got {momentum} and {weight_decay}")


def check_schedule(steps: tuple[int, ...], factors: tuple[float, ...], error: type[TLError]) -> None:
    """Refuse a step schedule that cannot mean what it says: steps are epochs ≥ 1, factors in (0, 1], and
    one factor for every step or one for all (a factor with no step to take it is a mistake)."""
    if any(step < 1 for step in steps) or not factors or any(not 0 < factor <= 1 for factor in factors):
        raise error(f"--lr-steps must be epochs ≥ 1 and --lr-factors in (0, 1], got {listed(steps)} "
                    f"and {listed(factors)}")
    if len(factors) > 1 and len(factors) > len(steps):
        raise error(f"--lr-factors gives {len(factors)} factors for {len(steps)} --lr-steps; give one factor, "
                    "or one per step")


def step_multiplier(steps: tuple[int, ...], factors: tuple[float, ...]):
    """epoch -> learning-rate multiplier: after each epoch in `steps` the rate is multiplied by the
    factor listed in its place (the last factor repeats; steps in any order), as neon's step drops."""
    factors = tuple(factors) or (0.1,)
    drops = [(step, factors[min(number, len(factors) - 1)]) for number, step in enumerate(steps)]

    def multiplier(epoch: int) -> float:
        return math.prod((factor for step, factor in drops if epoch >= step), start=1.0)

    return multiplier

@dataclass
class TrainingOptions:
    """How a torch head trains: optimizer, learning-rate schedule, epochs, early stopping."""

    optimizer: str = "sgd"
    lr: float | None = None  # None: DEFAULT_LR of the optimizer (0.05 for SGD, 0.001 for Adam)
    lr_steps: tuple[int, ...] = ()  # epochs after which lr is multiplied by lr_factors; empty: cosine to zero
    lr_factors: tuple[float, ...] = (0.1,)  # the factor of each step (the last repeats), as in stage three
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    max_epochs: int = 20
    early_stop: bool = False
    patience: int = 3
    device: str = "cpu"
    quiet: bool = True

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainingOptions":
        """The options recorded in a head file (files from before --lr-factors hold one lr_factor)."""
        saved = dict(saved)
        if "lr_factor" in saved:
            saved["lr_factors"] = (saved.pop("lr_factor"),)
        return cls(**{**saved, "lr_steps": tuple(saved.get("lr_steps", ())),
                      "lr_factors": tuple(saved.get("lr_factors", (0.1,)))})

    @property
    def rate(self) -> float:  # the learning rate a network starts at: --lr, else the optimizer's default
        return self.lr or DEFAULT_LR[self.optimizer]

    def check(self) -> None:
        check_optimizer(self.optimizer, HeadError)
        check_rates(self.lr, self.momentum, self.weight_decay, HeadError)
        check_schedule(self.lr_steps, self.lr_factors, HeadError)
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise HeadError("--batch-size, --max-epochs and --patience must be at least 1")


@dataclass
class Trainee:
    """One network of a shared pass: codes -> logits, with its own options (optimizer, lr, decay,
    schedule, early stopping) and the name its errors and progress use."""

    network: nn.Module
    options: TrainingOptions
    describe: str


def train_network(network: nn.Module, rows: CodeRows, val: CodeRows | None, options: TrainingOptions,
                  seed: int, describe: str) -> list[dict]:
    """Train `network` (codes -> logits) in place; returns the per-epoch curve.

    Each epoch streams the rows in a seeded shuffled block order. With `early_stop`, training stops
    after `patience` epochs without a lower validation loss, and the best epoch's weights are kept.
    """
    return train_networks([Trainee(network, options, describe)], rows, val, seed)[0]


def train_networks(trainees: list[Trainee], rows: CodeRows, val: CodeRows | None, seed: int,
                   alone_stops: bool = True) -> list[list[dict]]:
    """Train every network in place on the same streamed mini-batches: one read of each block (and of the
    validation rows) feeds them all, as a sweep's heads of one layer. They share the stream (batch size,
    epochs, device); each keeps its own optimizer, schedule and early stopping (a network that stops
    sits out the epochs left). Networks opening with the same Standardize share its output. Each draws
    its dropout masks from its own generator seeded with `seed`, so a network trains as it would alone.
    In a pass of several, one whose loss stops being finite leaves the pass with its last finite weights
    (its curve's last point says `diverged`) and the others go on; a pass of one stops with a HeadError,
    unless not `alone_stops` (a sweep's pass: its one head ranks last, as it would among others)."""
    first = trainees[0].options
    for trainee in trainees:
        trainee.options.check()
        if trainee.options.early_stop and val is None:
            raise HeadError("--early-stop needs a validation split; pass --val-cache or --val-fraction")
        stream = (trainee.options.batch_size, trainee.options.max_epochs, trainee.options.device)
        if stream != (first.batch_size, first.max_epochs, first.device):
            raise HeadError("networks trained together need one batch size, epoch count and device")
    device = resolve_device(first.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train(trainees, rows, val, seed, device, first, alone_stops and len(trainees) == 1)


def _rng_state(device) -> tuple:
    return (torch.random.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _train(trainees: list[Trainee], rows: CodeRows, val: CodeRows | None, seed: int, device, first,
           diverged_stops: bool) -> list[list[dict]]:
    states = []
    for trainee in trainees:
        options = trainee.options
        trainee.network.to(device)
        optimizer = make_optimizer([{"params": list(trainee.network.parameters()), "lr": options.rate}],
                                   options.optimizer, options.rate, options.momentum, options.weight_decay, HeadError)
        if options.lr_steps:  # the neon recipe's step drops
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, step_multiplier(options.lr_steps, options.lr_factors))
        else:
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.max_epochs)
        states.append({"optimizer": optimizer, "schedule": schedule, "curve": [], "best": (math.inf, None, 0),
                       "active": True, "rng": _rng_state(device)})  # every network's generator starts at the seed
    shared = _shared_standardize([trainee.network for trainee in trainees])
    bodies = [trainee.network[1:] if shared is not None else trainee.network for trainee in trainees]
    loss_function = loss_for(rows.multilabel)
    describe = trainees[0].describe if len(trainees) == 1 else f"{len(trainees)} heads"
    epochs = progress(range(first.max_epochs), desc=describe, unit="epoch", quiet=first.quiet)
    for epoch in epochs:
        active = [i for i, state in enumerate(states) if state["active"]]
        if not active:
            break
        for i in active:
            trainees[i].network.train()
        rng = np.random.default_rng([seed, epoch])
        totals, seen = dict.fromkeys(active, 0.0), 0
        linear = [i for i in active if _is_linear(bodies[i])] if shared is not None and len(active) > 1 else []
        alone = [i for i in active if i not in linear]
        for codes, targets in _mini_batches(rows, rng, first.batch_size, device):
            inputs = shared(codes) if shared is not None else codes
            losses = {}
            if linear:  # the linear heads as one matrix product: one pass over the batch, not one each
                logits = nn.functional.linear(inputs, torch.cat([bodies[i][0].weight for i in linear]),
                                              torch.cat([bodies[i][0].bias for i in linear]))
                parts = logits.split([bodies[i][0].out_features for i in linear], dim=1)
                losses.update({i: loss_function(part, targets) for i, part in zip(linear, parts)})
            for i in alone:  # its own dropout generator
                _set_rng_state(states[i]["rng"], device)
                losses[i] = loss_function(bodies[i](inputs), targets)
                states[i]["rng"] = _rng_state(device)
            values = torch.stack(list(losses.values())).tolist()
            for i, value in zip(list(losses), values):
                if not math.isfinite(value):
                    _diverge(trainees[i], states[i], "training", value, epoch, diverged_stops)
                    losses[i] = losses[i].detach()  # no step: it keeps its last finite weights
                    continue
                states[i]["optimizer"].zero_grad(set_to_none=True)
                totals[i] += value * len(codes)
            trained = [i for i in losses if states[i]["active"]]
            if trained:
                torch.stack([losses[i] for i in trained]).sum().backward()  # each loss reaches its own network
            for i in trained:
                states[i]["optimizer"].step()
            linear = [i for i in linear if states[i]["active"]]
            alone = [i for i in alone if states[i]["active"]]
            seen += len(codes)
            if not linear and not alone:  # every network left the pass in this batch: no loss to stack next
                break
        going = [i for i in active if "diverged" not in states[i]]
        scored = _evaluate_networks([trainees[i].network for i in going], val, loss_function, device) \
            if val is not None and going else [{} for _ in going]
        for i, validation in zip(going, scored):
            # the epoch's last steps can overflow the logits; a NaN in the curve made writing the head a traceback
            if validation and not math.isfinite(validation["val_loss"]):
                _diverge(trainees[i], states[i], "validation", validation["val_loss"], epoch, diverged_stops)
                continue
            state, options = states[i], trainees[i].options
            point = {"epoch": epoch + 1, "lr": state["optimizer"].param_groups[0]["lr"], "train_loss": totals[i] / seen}
            state["schedule"].step()
            point.update(validation)
            if validation and point["val_loss"] < state["best"][0]:
                state["best"] = (point["val_loss"], copy.deepcopy(trainees[i].network.state_dict()), epoch)
            state["curve"].append(point)
            if options.early_stop and epoch - state["best"][2] >= options.patience:
                state["active"] = False
        for i in [i for i in active if "diverged" in states[i]]:
            states[i]["curve"].append({"epoch": epoch + 1, "diverged": True})
        if len(trainees) == 1:
            epochs.set_postfix({k: f"{v:.4f}" for k, v in states[0]["curve"][-1].items() if k not in ("epoch", "lr")})
    for trainee, state in zip(trainees, states):
        if trainee.options.early_stop and state["best"][1] is not None:
            trainee.network.load_state_dict(state["best"][1])
            for point in state["curve"]:
                point["kept"] = point["epoch"] == state["best"][2] + 1
        trainee.network.cpu().eval()
    return [state["curve"] for state in states]


def _diverge(trainee: Trainee, state: dict, loss: str, value: float, epoch: int, stops: bool) -> None:
    """A network's training or validation loss stopped being finite: the pass stops with a HeadError when
    `stops`; else the network sits out the epochs left, marked diverged in that epoch."""
    if stops:
        raise HeadError(f"the {loss} loss of {trainee.describe} became {value} in epoch {epoch + 1}; lower "
                        "--lr or check the cache with tl info --verify")
    state["active"], state["diverged"] = False, epoch + 1


def _is_linear(body: nn.Module) -> bool:
    return isinstance(body, nn.Sequential) and len(body) == 1 and isinstance(body[0], nn.Linear)


def _shared_standardize(networks: list[nn.Module]) -> Standardize | None:
    """The Standardize every network opens with, when they all open with the same one."""
    firsts = [network[0] if isinstance(network, nn.Sequential) and len(network) > 1 else None for network in networks]
    if not all(isinstance(module, Standardize) for module in firsts):
        return None
    if all(torch.equal(m.mean, firsts[0].mean) and torch.equal(m.scale, firsts[0].scale) for m in firsts):
        return firsts[0]
    return None


def _mini_batches(rows: CodeRows, rng, batch_size: int, device: torch.device):
    """(codes, targets) mini-batches on `device`, block by block in the seeded order; for CUDA each block
    is read into pinned memory and its batches copied without blocking."""
    for positions, codes in rows.blocks(rng):
        targets = rows.targets[positions]
        codes_tensor = pinned(torch.from_numpy(codes), device)
        targets_tensor = pinned(torch.from_numpy(targets.astype(np.float32) if rows.multilabel else targets), device)
        for start in range(0, len(positions), batch_size):
            yield (to_device(codes_tensor[start:start + batch_size], device),
                   to_device(targets_tensor[start:start + batch_size], device))


def _evaluate_networks(networks: list[nn.Module], val: CodeRows, loss_function, device) -> list[dict]:
    """Validation loss and metric of each network, from one read of the validation rows (standardised
    once when the networks share their Standardize, the linear ones as one matrix product)."""
    for network in networks:
        network.eval()
    scores = [np.empty((len(val), network[-1].out_features)) for network in networks]
    losses = [0.0] * len(networks)
    shared = _shared_standardize(networks)
    bodies = [network[1:] if shared is not None else network for network in networks]
    linear = [i for i, body in enumerate(bodies) if _is_linear(body)] if shared is not None and len(networks) > 1 else []
    with torch.inference_mode():
        for positions, codes in val.blocks():
            inputs = torch.from_numpy(codes).to(device)
            inputs = shared(inputs) if shared is not None else inputs
            targets = torch.from_numpy(val.targets[positions].astype(np.float32) if val.multilabel
                                       else val.targets[positions]).to(device)
            outputs = {}
            if linear:
                logits = nn.functional.linear(inputs, torch.cat([bodies[i][0].weight for i in linear]),
                                              torch.cat([bodies[i][0].bias for i in linear]))
                outputs.update(zip(linear, logits.split([bodies[i][0].out_features for i in linear], dim=1)))
            for i, body in enumerate(bodies):
                logits = outputs[i] if i in outputs else body(inputs)
                losses[i] += loss_function(logits, targets).item() * len(positions)
                scores[i][positions] = probabilities(logits, val.multilabel)
    metric = "val_map" if val.multilabel else "val_accuracy"
    return [{"val_loss": loss / len(val), metric: validation_score(val.targets, scored)}
            for loss, scored in zip(losses, scores)]
