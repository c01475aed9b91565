"""Optional dependencies: a clear message naming the extra that installs one.

``pip install neuqi`` is a working quantizer; evaluation (lm-eval), plots
(matplotlib), the offline corpus builders and the exporters' libraries come
with extras, so a missing one must say which.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a ``RuntimeError`` that names ``pip install 'neuqi[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise RuntimeError(f"{purpose} needs the {top} package: pip install 'neuqi[{extra}]'") from exc
