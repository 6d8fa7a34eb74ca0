"""Which helper objects a saved detector may contain.

A fitted detector's state is mostly arrays, but a few detectors keep small helper objects
(a Gaussian scorer, a nearest-neighbour index). `oodscope.persistence` writes such an
object only when its class is registered here with `persistable`, and on load rebuilds
only registered classes: a saved file names a registered class, never arbitrary code.

A registered class either defines ``get_state() -> dict`` and a classmethod
``from_state(state) -> instance`` (for objects holding something that is not an array,
e.g. a faiss index), or is written as its ``vars()``, minus the names in its class
attribute ``transient_state`` (caches), and restored without calling ``__init__``.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["persistable", "persistable_class", "persistable_name"]

T = TypeVar("T", bound=type)

_CLASSES: dict[str, type] = {}


def persistable_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def persistable(cls: T) -> T:
    """Class decorator: instances may appear in a saved detector's state."""
    _CLASSES[persistable_name(cls)] = cls
    return cls


def persistable_class(name: str) -> type | None:
    """The registered class called ``name`` (its module is imported first), or None."""
    if name not in _CLASSES:
        module = name.rpartition(".")[0]
        while module and name not in _CLASSES:
            if not module.startswith("oodscope."):
                return None
            try:
                __import__(module)
            except ImportError:
                pass
            module = module.rpartition(".")[0]
    return _CLASSES.get(name)
