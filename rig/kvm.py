"""Decide whether KVM is real on this host by measuring it, not by /dev/kvm.

Some hosts (nested, PVM-style) expose /dev/kvm but emulate a guest's
kernel-mode code instruction by instruction: far slower than TCG. The probe
boots the microguest under KVM and counts heartbeats against guest time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rig.vm import FixtureVM, GuestStartError, MemoryBacking, VMConfig

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


def _cache_file() -> Path:
    return Path(tempfile.gettempdir()) / "liveupgrade-kvm-probe.json"


def _cache_key(binary: Path) -> str:
    """The probe holds until the host reboots or the binary changes."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    st = binary.resolve().stat()
    return f"{boot_id}:{binary.resolve()}:{st.st_ino}:{st.st_mtime_ns}"


async def decide_accel_async(binary: Path) -> AccelDecision:
    """The accelerator for this host; LIVEUPGRADE_ACCEL=tcg|kvm overrides the probe."""
    forced = os.environ.get("LIVEUPGRADE_ACCEL")
    if forced in ("tcg", "kvm"):
        return AccelDecision(forced, "LIVEUPGRADE_ACCEL")
    key = _cache_key(binary)
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(_cache_file().read_text())
        if cached["key"] == key:
            return AccelDecision(cached["accel"], cached["reason"] + " (cached)")
    decision = await probe_kvm(binary)
    with contextlib.suppress(OSError):
        _cache_file().write_text(json.dumps({"key": key, **dataclasses.asdict(decision)}))
    return decision


def decide_accel(binary: Path) -> AccelDecision:
    """decide_accel_async, for callers outside an event loop."""
    return asyncio.run(decide_accel_async(binary))
