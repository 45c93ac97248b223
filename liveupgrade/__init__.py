"""liveupgrade: move a running QEMU VM into a new QEMU binary on the same host.

The API for tooling authors is `upgrade()` (async); see docs/usage.md.
"""

from liveupgrade.engine import upgrade
from liveupgrade.errors import LiveUpgradeError
from liveupgrade.report import UpgradeEvent, UpgradeResult

__version__ = "0.1.0"

__all__ = ["LiveUpgradeError", "UpgradeEvent", "UpgradeResult", "__version__", "upgrade"]
