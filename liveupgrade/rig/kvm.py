"""Decide whether KVM is real on this host by measuring it, not by /dev/kvm.

Some hosts (nested, PVM-style) expose /dev/kvm but emulate a guest's
kernel-mode code instruction by instruction: far slower than TCG. The probe
boots the microguest under KVM and counts heartbeats against guest time.
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from liveupgrade.rig.vm import FixtureVM, GuestStartError, MemoryBacking, VMConfig

PROBE_SECONDS = 1.0
PROBE_HEARTBEAT_US = 1000
REAL_KVM_FRACTION = 0.8  # of the heartbeats a guest running at full speed sends


@dataclass(frozen=True)
class AccelDecision:
    accel: str
    reason: str


async def probe_kvm(binary: Path) -> AccelDecision:
    """Boot the microguest under KVM and compare its heartbeat rate to the ideal."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelDecision("tcg", "no usable /dev/kvm")
    config = VMConfig(binary=binary, accel="kvm", backing=MemoryBacking.ANONYMOUS,
                      ram_mib=64, fill_mib=4, heartbeat_us=PROBE_HEARTBEAT_US, name="lu-kvm-probe")
    vm = FixtureVM(config)
    try:
        await vm.start(boot_timeout=10)
        first = len(vm.heartbeat.log.beats)
        await asyncio.sleep(PROBE_SECONDS)
        rate = (len(vm.heartbeat.log.beats) - first) / PROBE_SECONDS
    except (GuestStartError, TimeoutError) as e:
        return AccelDecision("tcg", f"KVM guest did not run: {str(e)[:200]}")
    finally:
        await vm.close()
    ideal = 1e6 / PROBE_HEARTBEAT_US
    if rate >= REAL_KVM_FRACTION * ideal:
        return AccelDecision("kvm", f"KVM probe: {rate:.0f} heartbeats/s of {ideal:.0f}")
    return AccelDecision("tcg", f"KVM probe: only {rate:.0f} heartbeats/s of {ideal:.0f} "
                                "(emulated or nested KVM); using TCG")


@functools.cache
def decide_accel(binary: Path) -> AccelDecision:
    """The accelerator for this host; LIVEUPGRADE_ACCEL=tcg|kvm overrides the probe."""
    forced = os.environ.get("LIVEUPGRADE_ACCEL")
    if forced in ("tcg", "kvm"):
        return AccelDecision(forced, "LIVEUPGRADE_ACCEL")
    return asyncio.run(probe_kvm(binary))
