"""The extra layers an image benchmark extracts: the union of those its detectors read, once.

Detectors that read other layers than the penultimate declare them in ``requires``: an
instance lists one ``"layer:<module>"`` per layer it reads, its class the wildcard
``"layer:*"`` (the layers are named per instance). A builder

1. gives the detectors whose layers are named per instance this network's layers when the
   user named none (`image_layer_defaults`: the ends of the network's stages, found by one
   probing forward pass), as ``FeatureSet.detector_kwargs``;
2. builds the requested detectors with those arguments and collects the ``"layer:<m>"``
   fields they require (`layer_plan`): each layer once, with the per-channel pooling its
   readers declare (class attribute ``layer_pooling``), so the single extraction pass keeps
   ``(N, C)`` statistics instead of whole feature maps; a layer whose readers disagree on the
   pooling, or one of which declares none, is kept as a whole map;
3. passes the plan to `oodscope.extract` (``layers=`` / ``layer_pooling=``).

Gram is given ``layers=[]`` (its penultimate features only): with ``layers=None`` it would
read every stored ``layer:*`` extra, and those are pooled vectors here, not the maps whose
Gram matrices the method needs.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..detectors._network import ANY_LAYER, LAYER_PREFIX
from ..detectors.base import get_detector_class, list_detectors
from .spec import ProviderOptions

__all__ = ["image_layer_defaults", "layer_plan", "plan_for_options"]


def _stage_names(net: Any, in_shape: tuple[int, ...]) -> list[str]:
    """`stage_outputs` of ``net`` for one zero input; a stage that is a ``Sequential`` called
    ``features`` is named by its last child (``features`` means the penultimate features to
    the multi-layer detectors). None for a TorchScript network."""
    import torch

    from ..detectors._network import model_device_dtype, stage_outputs

    if isinstance(net, torch.jit.ScriptModule):
        return []  # no forward hooks on TorchScript modules: no layer can be read
    device, dtype = model_device_dtype(net)
    modules = dict(net.named_modules())
    names = []
    for name in stage_outputs(net, torch.zeros((1, *in_shape), device=device, dtype=dtype)):
        if name == "features":
            mod = modules[name]
            children = list(mod.named_children())
            if not isinstance(mod, torch.nn.Sequential) or not children:
                continue
            name = f"{name}.{children[-1][0]}"
        if name not in names:
            names.append(name)
    return names


def image_layer_defaults(net: Any, in_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """``{detector: {"layers": [...]}}`` for ``net`` taking inputs of ``in_shape`` (C, H, W).

    SEM reads the first stage (low-level style statistics, as ``layer1`` of the paper's
    ResNet); MultiLayer the later stages and the penultimate features (oodeel aggregates a
    ResNet's ``layer1..layer4``; the first stage is left to SEM so that no layer needs two
    poolings); Gram its penultimate features (see the module docstring). A network without
    feature maps gets no SEM / MultiLayer layers: those two are then skipped with a reason."""
    out: dict[str, dict[str, Any]] = {"gram": {"layers": []}}
    stages = _stage_names(net, in_shape)
    if stages:
        out["sem"] = {"layers": stages[:1]}
        out["multilayer"] = {"layers": [*(stages[1:] or stages), "features"]}
    return out


def layer_plan(detectors: Iterable[Any] | None, detector_kwargs: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, str | None]:
    """``{module: pooling}``: every ``"layer:<module>"`` field the requested detectors (names or
    instances; None: every registered detector) require once built with ``detector_kwargs``
    (``"*"`` and per-name entries, as the runner builds them)."""
    from .runner import _build

    plan: dict[str, str | None] = {}
    for spec in list_detectors() if detectors is None else detectors:
        cls = get_detector_class(spec) if isinstance(spec, str) else type(spec)
        if ANY_LAYER not in cls.all_requirements():
            continue
        kwargs = {**detector_kwargs.get("*", {}), **detector_kwargs.get(cls.name, {})}
        try:
            needs = _build(cls, spec, kwargs).all_requirements()
        except Exception:  # noqa: BLE001 - the runner reports a detector that cannot be built
            continue
        how = getattr(cls, "layer_pooling", None)
        for key in sorted(needs):
            if not key.startswith(LAYER_PREFIX) or key == ANY_LAYER:
                continue
            name = key[len(LAYER_PREFIX):]
            plan[name] = how if plan.get(name, how) == how else None
    return plan


def plan_for_options(net: Any, in_shape: tuple[int, ...], options: ProviderOptions
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, str | None]]:
    """``(detector_kwargs, layer plan)`` of an image builder: the default layers of this network
    and the layers the requested detectors (``options.detectors``) read; an empty plan when the
    run reads no extra layers (``options.fields`` without ``"layer:*"``)."""
    kwargs = image_layer_defaults(net, in_shape)
    if not options.wants_field(ANY_LAYER):
        return kwargs, {}
    return kwargs, layer_plan(options.detectors, {"*": {"model": net}, **kwargs})
