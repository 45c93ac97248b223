"""Network benchmark: what a VM's network users see of a 7.2 -> 10.0 upgrade.

Each run boots a fresh Linux guest (512 MiB, shared file RAM) with a
virtio-net NIC on a tap in a private network namespace, a console on a unix
socket and a VNC display, then observes the same 3 s window three times, side
by side: with nothing happening (this host's noise under TCG), with a bare
QMP stop + cont (the floor: what any pause costs this guest's network), and
with an upgrade one second in; and, on a second guest with the same devices,
its raw-QMP twin: the fewest raw steps that keep the NIC working (the tap's
descriptor duplicated and passed, nothing else). For both upgrades the
guest's pause is broken down: the heartbeat gap spanning switchover, QEMU's
STOP -> RESUME events (the vCPU pause) and QEMU's own downtime. Per window: pings lost (100/s),
the longest stall of a TCP counter stream (1 record/ms from the guest),
the longest time the QMP and console sockets served no client, and for the
upgrade the time until a new VNC client gets the server's greeting.

    .venv/bin/python -m benchmarks.network [--runs 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench import fmt, machine_facts, summarize
from benchmarks.raw_qmp import raw_upgrade
from liveupgrade import fdpass
from liveupgrade.report import UpgradeResult
from rig import FixtureVM, GuestKind, TapNetwork, VMConfig, find_fixtures
from rig.kvm import decide_accel_async
from rig.probes import NetworkObservation, observe_network, observe_upgrade, vnc_banner

DEFAULT_OUT = Path(__file__).parent / "results" / "network"
RUN_TIMEOUT = 300.0  # one run takes ~30 s; a hang is reported, not waited out


def _tap_fd(pid: int) -> int:
    """The source's tap: its one /dev/net/tun descriptor."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(entry) == "/dev/net/tun":
                return int(entry.name)
    raise RuntimeError(f"PID {pid} holds no tap")


async def raw_twin(vm: FixtureVM, net: TapNetwork, target: Path,
                   mark: Callable[[], None]) -> dict[str, Any]:
    """The fewest raw steps that keep the NIC working: the source's tap descriptor
    duplicated (pidfd_getfd) and passed as -netdev tap,fd=N, nothing else. The
    console and VNC go to private paths (not handed over), and the old QEMU is killed
    as the engine kills it."""
    (fd,) = fdpass.take_fds(vm.pid, [_tap_fd(vm.pid)]).values()

    def rewrite(argv: list[str]) -> list[str]:
        out = []
        for before, arg in zip(["", *argv], argv, strict=False):
            if arg.startswith("tap,id=net0,"):
                arg = f"tap,id=net0,fd={fd}"
            elif before == "-vnc":
                arg = f"unix:{vm.dir / 'raw-vnc.sock'}"
            arg = arg.replace(str(vm.console_path), str(vm.dir / "raw-console.sock"))
            out.append(arg)
        return out

    try:
        figures, _ = await raw_upgrade(vm.argv(), vm.qmp_path, target, "shared", vm.dir,
                                       rewrite=rewrite, pass_fds=[fd], preexec_fn=net.preexec(),
                                       source_pid=vm.pid, before_cont=mark)
    finally:
        os.close(fd)
    return figures


def _row(kind: str, seen: NetworkObservation) -> dict[str, Any]:
    return {"kind": kind, "pings_lost": seen.pings_lost, "pings_sent": seen.pings_sent,
            "tcp_faults": len(seen.stream_faults), "tcp_stall_ms": seen.longest_tcp_stall_ms,
            "pause_ms": seen.guest_pause_ms,
            **{f"{name}_gap_ms": gap for name, gap in seen.accept_gaps_ms.items()}}


async def one_run(accel: str) -> list[dict[str, Any]]:
    fx = find_fixtures()

    def config_for(net: TapNetwork) -> VMConfig:
        return VMConfig(binary=fx.qemu_old, guest=GuestKind.LINUX, ram_mib=512, network=net,
                        console_socket=True, vnc=True, heartbeat_us=10000, accel=accel)

    with TapNetwork() as net:
        async with FixtureVM(config_for(net), fx) as vm:
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

            seen = await observe_upgrade(vm, net, fx.qemu_new)
            returned = time.monotonic()
            reader, writer = await net.connect("127.0.0.1", vm.VNC_PORT)
            ok = (await vnc_banner(reader)).startswith(b"RFB ")
            vnc_ms = (time.monotonic() - returned) * 1e3
            writer.close()
            result = seen.action_result
            assert isinstance(result, UpgradeResult)
            row = _row("upgrade", seen) | {
                "vnc_ok": ok, "vnc_connect_ms": vnc_ms if ok else None,
                "qemu_downtime_ms": result.downtime_ms, "vcpu_pause_ms": result.vcpu_pause_ms}
    with TapNetwork() as net:  # the raw twin, on a guest of its own with the same devices
        async with FixtureVM(config_for(net), fx) as vm:
            twin = await observe_network(vm, net, lambda mark: raw_twin(vm, net, fx.qemu_new,
                                                                        mark))
            figures = twin.action_result
            assert isinstance(figures, dict)
            raw = _row("raw-qmp", twin) | {"qemu_downtime_ms": figures["downtime_ms"],
                                           "vcpu_pause_ms": figures["vcpu_pause_ms"]}
    return [_row("baseline", baseline), _row("stop-cont", floor), raw, row]


def markdown(rows: list[dict[str, Any]], facts: dict[str, Any], runs: int) -> str:
    kinds = ("baseline", "stop-cont", "raw-qmp", "upgrade")
    stats = {kind: summarize([r for r in rows if r["kind"] == kind]) for kind in kinds}
    lines = [f"Network across a 7.2 -> 10.0 upgrade: median (min-max) of {runs} runs, "
             f"{facts['accel']}, {facts['cpu']}, {facts['date']}", "",
             "| measure | nothing (noise) | bare stop + cont (floor) | raw-QMP twin (tap fd only) "
             "| liveupgrade |",
             "|---|---|---|---|---|"]
    for key, label, digits in (
            ("pings_lost", "pings lost of 300 (100/s)", 0),
            ("tcp_faults", "TCP counter faults (reset, loss, duplicate)", 0),
            ("tcp_stall_ms", "longest TCP stall, ms", 1),
            ("qmp_gap_ms", "QMP socket: longest time no client served, ms", 1),
            ("console_gap_ms", "console socket: longest time no client served, ms", 1),
            ("pause_ms", "guest pause: the heartbeat gap spanning switchover, ms", 1),
            ("vcpu_pause_ms", "vCPU pause: source STOP -> destination RESUME (QEMU), ms", 1),
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
        up, raw = got[-1], got[-2]
        print(f"run {run + 1}/{args.runs}: pause {up['pause_ms']:.0f} ms (raw twin "
              f"{raw['pause_ms']:.0f}), vCPUs {up['vcpu_pause_ms']:.1f} ms (raw twin "
              f"{raw['vcpu_pause_ms']:.1f}), {up['pings_lost']} pings lost, TCP stall "
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
