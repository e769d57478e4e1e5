"""Small helpers shared across vitlens that import nothing heavy."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import an optional dependency, or fail in one line naming the extra that installs it.

    Args:
        module: the module to import, e.g. ``"transformers"``.
        extra: the vitlens extra that provides it, e.g. ``"hf"``.
        what: the feature that needs it, for the message (default: the module's name).

    Returns:
        The imported module.

    Raises:
        VitlensError: the module is not installed.

    Example:
        >>> transformers = require("transformers", extra="hf", what="hf: models")  # doctest: +SKIP
    """
    from .errors import VitlensError

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module exists but one of its own dependencies is missing: let that surface as is
        need = what or module
        raise VitlensError(
            f"{need} needs {module.split('.')[0]}, which is not installed: pip install 'vitlens[{extra}]'"
        ) from None
