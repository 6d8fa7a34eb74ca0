"""Constructors that only store their arguments.

Detectors, training objectives, encoders and heads follow the scikit-learn convention: the
constructor stores each hyperparameter unchanged under its own name and does no work
(`Detector.get_params` reads them back by name). Where a constructor has many
parameters, ``store_params(self, locals())`` says that once instead of one
``self.name = name`` line a parameter, and a parameter cannot be forgotten or stored under
another name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["store_params"]

#: Names ``locals()`` holds at the top of a method besides its parameters.
_NOT_PARAMETERS = frozenset({"self", "__class__"})


def store_params(obj: object, arguments: Mapping[str, Any]) -> None:
    """Set every entry of ``arguments`` as an attribute of ``obj``, in order.

    Call it as the first statement of ``__init__`` with ``locals()``: at that point the
    locals are exactly the constructor's parameters, in signature order (plus ``self``, and
    ``__class__`` where the method uses ``super()``, which are skipped).
    """
    for name, value in arguments.items():
        if name not in _NOT_PARAMETERS:
            setattr(obj, name, value)
