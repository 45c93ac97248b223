"""liveupgrade: move a running QEMU VM into a new QEMU binary on the same host.

The API for tooling authors is `upgrade()`, `plan()` and `recover()` (async);
see docs/usage.md. The names are imported on first use, so that the keeper
process and `--help` start without loading the engine.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "upgrade": "liveupgrade.engine",
    "plan": "liveupgrade.engine",
    "recover": "liveupgrade.recovery",
    "LiveUpgradeError": "liveupgrade.errors",
    "UpgradeEvent": "liveupgrade.report",
    "UpgradeResult": "liveupgrade.report",
}

__all__ = ["LiveUpgradeError", "UpgradeEvent", "UpgradeResult", "__version__", "plan",
           "recover", "upgrade"]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'liveupgrade' has no attribute {name!r}")
