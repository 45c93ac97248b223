"""The QEMU test rig: fixture guests under real QEMU, and a host-side heartbeat reader.

Test harness, kept out of the installed package (it runs guests as root and
writes to /var/lib/liveupgrade-rig). It lives beside tests/ and benchmarks/
because the demo, the benchmarks and the tests start the same guests the same
way; `liveupgrade demo` imports it from the source checkout.
"""

from rig.heartbeat import Heartbeat, HeartbeatLog, HeartbeatServer
from rig.netns import TapNetwork
from rig.paths import FixturePaths, find_fixtures
from rig.vm import FixtureVM, GuestKind, MemoryBacking, VMConfig

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
