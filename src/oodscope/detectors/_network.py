"""Helpers for detectors that run the network again or read other layers than the penultimate.

* running the model: device/dtype of its parameters, float input batches, the logits of an
  output, and forward hooks that capture (or replace) a module's output;
* layer choice: ``stage_outputs`` finds, by one probing forward pass, the output of the last
  module at each spatial resolution (the end of every stage of a CNN: ``layer1..layer4`` of a
  ResNet), which is what multi-layer methods (Lee et al.'s feature ensemble, RankFeat's
  "block 4") use when no layer is named;
* per-layer extras: arrays travel in `Features.extras` under ``"layer:<module name>"``;
  ``pool_layer`` turns a feature map into per-channel statistics (spatial mean, variance);
* hyperparameter-dependent requirements: `InstanceNeeds` makes ``requires`` /
  ``fit_requirements`` class attributes that give a broad default on the class (registry
  table, runner selection) and the exact set on an instance (e.g. one ``"layer:<m>"`` per
  named layer).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..features import Features

__all__ = [
    "LAYER_PREFIX",
    "ANY_LAYER",
    "layer_key",
    "InstanceNeeds",
    "InstanceNeedsMethod",
    "check_model",
    "model_device_dtype",
    "input_batches",
    "forward_logits",
    "capture_outputs",
    "head_of",
    "stage_outputs",
    "pool_layer",
    "float_inputs",
    "torch_single_thread",
]

#: Key prefix of per-layer activations in `Features.extras` (what `oodscope.extract` writes).
LAYER_PREFIX = "layer:"
#: Class-level requirement of detectors whose layers are named per instance.
ANY_LAYER = "layer:*"


def layer_key(name: str) -> str:
    return name if name.startswith(LAYER_PREFIX) else LAYER_PREFIX + name


class InstanceNeeds:
    """A ``requires``-style attribute: ``default`` on the class, ``compute(obj)`` on an instance."""

    def __init__(self, default: Iterable[str], compute: Callable[[Any], Iterable[str]]):
        self.default = frozenset(default)
        self.compute = compute

    def __get__(self, obj, cls=None):
        return self.default if obj is None else frozenset(self.compute(obj))


class InstanceNeedsMethod(InstanceNeeds):
    """The same for the ``fit_requirements()`` / ``all_requirements()`` methods."""

    def __get__(self, obj, cls=None):
        if obj is None:
            return lambda: self.default
        return lambda: frozenset(self.compute(obj))


# ------------------------------------------------------------------ running the model
def check_model(owner: object, model: Any) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"{type(owner).__name__} runs the network again: pass model=<torch.nn.Module> "
            f"(got {type(model).__name__})."
        )


def model_device_dtype(model) -> tuple[Any, Any]:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def float_inputs(owner: object, f: Features) -> np.ndarray:
    inputs = f.extras["inputs"]
    if inputs.dtype.kind != "f":
        raise ValueError(
            f"{type(owner).__name__} needs floating-point network inputs; extras['inputs'] has "
            f"dtype {inputs.dtype} (token ids?). Store images with extract(..., keep_inputs=True)."
        )
    return inputs


def input_batches(inputs: np.ndarray, batch_size: int, model) -> Iterator[tuple[slice, Any]]:
    """``(rows, tensor)`` batches of ``inputs`` on the model's device and in its dtype."""
    import torch

    device, dtype = model_device_dtype(model)
    step = int(batch_size)
    for start in range(0, len(inputs), step):
        rows = slice(start, min(start + step, len(inputs)))
        batch = np.ascontiguousarray(inputs[rows])
        yield rows, torch.as_tensor(batch).to(device=device, dtype=dtype)


def forward_logits(model, x):
    from .._outputs import logits_of

    return logits_of(model(x))


@contextlib.contextmanager
def torch_single_thread():
    """Run small batched LAPACK calls (per-sample SVDs) on one torch thread.

    On a busy machine torch's threaded batched SVD of (128, 128, 49) float64 matrices took
    84 s with 2 threads against 0.7 s with one (the same effect as
    `oodscope._numeric.single_threaded_blas` for numpy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def resolve_modules(owner: object, model, names: Sequence[str]) -> dict[str, Any]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"{type(owner).__name__}: no module named {missing} in the model; some valid names: "
            f"{[n for n in modules if n][:40]}"
        )
    return {n: modules[n] for n in names}


@contextlib.contextmanager
def capture_outputs(modules: dict[str, Any], replace: Callable | None = None):
    """Record each module's output in the yielded dict (``name -> tensor``); with
    ``replace(name, output)``, the module's output is replaced by what it returns."""
    captured: dict[str, Any] = {}
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            if replace is not None:
                output = replace(name, output)
            captured[name] = output
            return output if replace is not None else None

        return fn

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(hook(name)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def head_of(owner: object, model):
    """``(name, module)`` of the classifier head (the last ``nn.Linear``), or a clear error."""
    from ..extraction import find_head

    name, mod = find_head(model)
    if mod is None:
        raise ValueError(
            f"{type(owner).__name__} needs the classifier head (an nn.Linear) of the model; "
            "none was found."
        )
    return name, mod


@contextlib.contextmanager
def capture_head_input(model, head):
    captured: dict[str, Any] = {}
    handle = head.register_forward_pre_hook(lambda m, i: captured.__setitem__("h", i[0]))
    try:
        yield captured
    finally:
        handle.remove()


def stage_outputs(model, example) -> list[str]:
    """Names of the modules whose outputs end each stage: for every spatial resolution of
    the 4-D outputs seen in one forward pass of ``example`` (one input batch), the module that
    produced that resolution last (containers finish after their children, so a ResNet gives
    ``layer1 .. layer4``). A 1×1 output (global pooling) is not a feature map and is left
    out. Empty for networks without 4-D activations."""
    import torch

    order: list[tuple[str, tuple]] = []
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def fn(module, inputs, output, _name=name):
            if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
                order.append((_name, tuple(output.shape[2:])))

        handles.append(mod.register_forward_hook(fn))
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    last: dict[tuple, tuple[int, str]] = {}
    for i, (name, size) in enumerate(order):
        last[size] = (i, name)
    return [name for _, name in sorted(last.values())]


# ------------------------------------------------------------------ per-layer extras
def pool_layer(arr: np.ndarray, how: str = "mean") -> np.ndarray:
    """Per-sample vectors from a layer's activations, in float64.

    2-D arrays are returned as they are. Maps of shape ``(N, C, *spatial)`` become
    ``"mean"``: the per-channel spatial mean (global average pooling), or ``"stat"``: the
    per-channel spatial mean followed by the per-channel spatial variance (the feature
    statistics of Lee et al. and SEM's low-level style features).
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        return a.astype(np.float64, copy=False)
    if a.ndim < 2:
        raise ValueError(f"layer activations must be at least 2-D (N, ...), got shape {a.shape}.")
    flat = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64, copy=False)
    mean = flat.mean(axis=2)
    if how == "mean":
        return mean
    if how == "stat":
        return np.concatenate([mean, flat.var(axis=2)], axis=1)
    raise ValueError(f"layer pooling must be 'mean' or 'stat', got {how!r}.")


def torch_pool(t, how: str = "mean"):
    """`pool_layer` for torch tensors inside a forward pass (keeps the autograd graph)."""
    if t.ndim == 2:
        return t
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    mean = flat.mean(dim=2)
    if how == "mean":
        return mean
    import torch

    return torch.cat([mean, flat.var(dim=2, unbiased=False)], dim=1)
