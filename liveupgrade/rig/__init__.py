"""The QEMU test rig: fixture guests under real QEMU, and a host-side heartbeat reader.

It lives inside the package (not only under tests/) because the demo and the
benchmarks use the same guests, started the same way, as the test suite.
"""

from liveupgrade.rig.heartbeat import Heartbeat, HeartbeatLog, HeartbeatServer
from liveupgrade.rig.netns import TapNetwork
from liveupgrade.rig.paths import FixturePaths, find_fixtures
from liveupgrade.rig.vm import FixtureVM, GuestKind, MemoryBacking, VMConfig

__all__ = [
    "FixturePaths",
    "FixtureVM",
    "GuestKind",
    "Heartbeat",
    "HeartbeatLog",
    "HeartbeatServer",
    "MemoryBacking",
    "TapNetwork",
    "VMConfig",
    "find_fixtures",
]
