"""Network benchmark: what a VM's network users see of a 7.2 -> 10.0 upgrade.

Each run boots a fresh Linux guest (512 MiB, shared file RAM) with a
virtio-net NIC on a tap in a private network namespace, a console on a unix
socket and a VNC display, then observes the same 3 s window three times, side
by side: with nothing happening (this host's noise under TCG), with a bare
QMP stop + cont (the floor: what any pause costs this guest's network), and
with an upgrade one second in. Per window: pings lost (100/s),
the longest stall of a TCP counter stream (1 record/ms from the guest),
the longest time the QMP and console sockets served no client, and for the
upgrade the time until a new VNC client gets the server's greeting.

    .venv/bin/python -m benchmarks.network [--runs 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench import fmt, machine_facts, summarize
from liveupgrade import engine
from liveupgrade.report import UpgradeEvent, UpgradeResult
from rig import FixtureVM, GuestKind, TapNetwork, VMConfig, find_fixtures
from rig.kvm import decide_accel_async
from rig.probes import NetworkObservation, observe_network, vnc_banner

DEFAULT_OUT = Path(__file__).parent / "results" / "network"
RUN_TIMEOUT = 300.0  # one run takes ~30 s; a hang is reported, not waited out


def _row(kind: str, seen: NetworkObservation) -> dict[str, Any]:
    return {"kind": kind, "pings_lost": seen.pings_lost, "pings_sent": seen.pings_sent,
            "tcp_faults": len(seen.stream_faults), "tcp_stall_ms": seen.longest_tcp_stall_ms,
            "pause_ms": seen.guest_pause_ms,
            **{f"{name}_gap_ms": gap for name, gap in seen.accept_gaps_ms.items()}}


async def one_run(accel: str) -> list[dict[str, Any]]:
    fx = find_fixtures()
    with TapNetwork() as net:
        config = VMConfig(binary=fx.qemu_old, guest=GuestKind.LINUX, ram_mib=512, network=net,
                          console_socket=True, vnc=True, heartbeat_us=10000, accel=accel)
        async with FixtureVM(config, fx) as vm:
            async def idle(mark: Callable[[], None]) -> None:
                mark()
                await asyncio.sleep(0.1)

            baseline = await observe_network(vm, net, idle)

            async def stop_cont(mark: Callable[[], None]) -> None:
                async with vm.qmp() as client:
                    mark()
                    await client.execute("stop")
                    await client.execute("cont")

            floor = await observe_network(vm, net, stop_cont)

            async def upgrade(mark: Callable[[], None]) -> UpgradeResult:
                def note(event: UpgradeEvent) -> None:
                    if event.phase == "switchover":
                        mark()
                return await engine.upgrade(vm.pid, fx.qemu_new, on_event=note)

            seen = await observe_network(vm, net, upgrade)
            returned = time.monotonic()
            reader, writer = await net.connect("127.0.0.1", vm.VNC_PORT)
            ok = (await vnc_banner(reader)).startswith(b"RFB ")
            vnc_ms = (time.monotonic() - returned) * 1e3
            writer.close()
            result = seen.action_result
            assert isinstance(result, UpgradeResult)
            row = _row("upgrade", seen) | {
                "vnc_ok": ok, "vnc_connect_ms": vnc_ms if ok else None,
                "qemu_downtime_ms": result.downtime_ms}
            return [_row("baseline", baseline), _row("stop-cont", floor), row]


def markdown(rows: list[dict[str, Any]], facts: dict[str, Any], runs: int) -> str:
    kinds = ("baseline", "stop-cont", "upgrade")
    stats = {kind: summarize([r for r in rows if r["kind"] == kind]) for kind in kinds}
    lines = [f"Network across a 7.2 -> 10.0 upgrade: median (min-max) of {runs} runs, "
             f"{facts['accel']}, {facts['cpu']}, {facts['date']}", "",
             "| measure | nothing (noise) | bare stop + cont (floor) | upgrade |",
             "|---|---|---|---|"]
    for key, label, digits in (
            ("pings_lost", "pings lost of 300 (100/s)", 0),
            ("tcp_faults", "TCP counter faults (reset, loss, duplicate)", 0),
            ("tcp_stall_ms", "longest TCP stall, ms", 1),
            ("qmp_gap_ms", "QMP socket: longest time no client served, ms", 1),
            ("console_gap_ms", "console socket: longest time no client served, ms", 1),
            ("pause_ms", "guest pause: the heartbeat gap spanning switchover, ms", 1),
            ("qemu_downtime_ms", "QEMU's own downtime, ms", 0),
            ("vnc_connect_ms", "new VNC client greeted after the upgrade returned, ms", 1)):
        lines.append(f"| {label} | " + " | ".join(fmt(stats[k].get(key), digits) for k in kinds)
                     + " |")
    vnc = [r["vnc_ok"] for r in rows if r["kind"] == "upgrade"]
    lines += ["", f"VNC reconnect after the upgrade: {sum(vnc)}/{len(vnc)} runs."]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    fx = find_fixtures()
    accel = (await decide_accel_async(fx.qemu_old)).accel
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        async with asyncio.timeout(RUN_TIMEOUT):
            got = await one_run(accel)
        rows += got
        up = got[-1]
        print(f"run {run + 1}/{args.runs}: {up['pings_lost']} pings lost, TCP stall "
              f"{up['tcp_stall_ms']:.0f} ms, QMP gap {up['qmp_gap_ms']:.1f} ms, console gap "
              f"{up['console_gap_ms']:.1f} ms, VNC {'ok' if up['vnc_ok'] else 'FAILED'}",
              file=sys.stderr)
    facts = machine_facts(fx, accel)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "network.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    text = markdown(rows, facts, args.runs)
    (args.out / "network.md").write_text(text)
    print(text)
    lost = [r["pings_lost"] for r in rows if r["kind"] == "upgrade"]
    print(f"results in {args.out} (median pings lost {statistics.median(lost)})", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs, each on a fresh guest")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
