"""Benchmark live upgrade against its alternatives, side by side, in one run.

    .venv/bin/python -m benchmarks.bench --quick        # < 3 minutes, CI-sized
    .venv/bin/python -m benchmarks.bench                # the full matrix

Every figure of a guest pause is seen from outside the guest: the largest
gap between the microguest's heartbeats (1 ms period) as they arrive on the
host. Each case runs --runs times; medians and min-max go to a results
folder as JSON, a markdown table and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks import command
from benchmarks.raw_qmp import raw_upgrade
from liveupgrade import engine, monitor
from liveupgrade.report import UpgradeResult
from rig import (
    FixturePaths,
    FixtureVM,
    GuestKind,
    MemoryBacking,
    VMConfig,
    find_fixtures,
)
from rig.kvm import decide_accel_async

RESULTS = Path(__file__).resolve().parent / "results"
HEARTBEAT_US = 1000
LINUX_HEARTBEAT_US = 10000
PLOT_DIRTY_MIB = 50
FILL_MIB = 256  # memory the guest writes and verifies: a working set, not all of RAM
FILL_COPIED_MIB = 1024  # where RAM is copied, a larger working set makes the copy real


@dataclass(frozen=True)
class Case:
    """One row of the matrix."""

    method: str  # liveupgrade | raw-qmp | stop-cont | save-restore | cold-restart
    mode: str  # shared | copy | cpr-transfer | cpr-exec | - (baselines)
    ram_gib: int
    dirty_mib: int
    pair: str  # "7.2->10.0"
    guest: str = "microguest"  # or "linuxguest": Debian's kernel, virtio disk, 10 ms heartbeat

    @property
    def label(self) -> str:
        return (f"{self.method} {self.mode} {self.ram_gib}G {self.dirty_mib}MiB/s {self.pair}"
                f"{'' if self.guest == 'microguest' else ' ' + self.guest}")


def backing_for(mode: str) -> tuple[MemoryBacking, bool]:
    return {"shared": (MemoryBacking.FILE, False), "cpr-transfer": (MemoryBacking.MEMFD, True),
            "cpr-exec": (MemoryBacking.MEMFD, True),
            "copy": (MemoryBacking.ANONYMOUS, False)}.get(mode, (MemoryBacking.FILE, False))


class MemorySampler:
    """The largest drop in host available memory while it runs: the upgrade's extra RAM."""

    def __init__(self) -> None:
        self.baseline = psutil.virtual_memory().available
        self.lowest = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.lowest = min(self.lowest, psutil.virtual_memory().available)
            await asyncio.sleep(0.005)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MemorySampler]:
        self._task = asyncio.create_task(self._sample())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def peak_extra_mib(self) -> float:
        return (self.baseline - self.lowest) / 2**20


def binaries(fx: FixturePaths, pair: str) -> tuple[Path, Path]:
    pick = {"7.2": fx.qemu_old, "10.0": fx.qemu_new, "11.1": fx.qemu_11}
    old, new = pair.split("->")
    return pick[old], pick[new]


async def boot(case: Case, fx: FixturePaths, accel: str) -> FixtureVM:
    src, _ = binaries(fx, case.pair)
    backing, aux = backing_for(case.mode)
    copies_ram = case.mode == "copy" or case.method == "save-restore"
    ram_mib = case.ram_gib * 1024
    linux = case.guest == "linuxguest"
    vm = FixtureVM(VMConfig(
        binary=src, ram_mib=ram_mib, backing=backing, aux_ram_share=aux, accel=accel,
        guest=GuestKind.LINUX if linux else GuestKind.MICRO,
        fill_mib=min(ram_mib - 64, FILL_COPIED_MIB if copies_ram else FILL_MIB) // (4 if linux
                                                                                    else 1),
        dirty_rate_mib=case.dirty_mib,
        heartbeat_us=LINUX_HEARTBEAT_US if linux else HEARTBEAT_US, name="lu-bench"), fx)
    try:
        await vm.start()
        await vm.heartbeat.wait_for(lambda log: bool(log.ready), 120)  # memory filled
        await vm.heartbeat.wait_beats(30 if linux else 300, 30)  # dirtying in steady state
    except BaseException:
        await vm.close()
        raise
    return vm


async def measure(case: Case, fx: FixturePaths, accel: str,
                  isolated: bool = False) -> dict[str, Any]:
    """One run of one case; every figure in ms, MiB or bytes."""
    vm = await boot(case, fx, accel)
    extra: list[subprocess.Popen[bytes]] = []
    try:
        sampler = MemorySampler()
        started = time.monotonic()
        row: dict[str, Any] = {}
        async with sampler.running():
            row.update(await _run_method(case, vm, fx, extra, isolated))
        finished = time.monotonic()
        await vm.heartbeat.wait_beats(20 if case.guest == "linuxguest" else 200, 120)
        log = vm.heartbeat.log
        if case.method == "cold-restart":  # the guest rebooted: the pause ends at its first beat
            restart_at = row.pop("restart_at")
            after = [b for b in log.beats if b.host_time > restart_at]
            row["pause_ms"] = (after[0].host_time - started) * 1e3
        else:
            row["pause_ms"] = log.max_gap(started, finished).seconds * 1e3
            row["sequence_faults"] = len(log.sequence_faults())
            row["memory_errors"] = log.last.errors if log.last else None
        row["wall_ms"] = row.get("wall_ms", (finished - started) * 1e3)
        row["peak_extra_host_mib"] = sampler.peak_extra_mib
        return row
    finally:
        await vm.close()
        for proc in extra:
            proc.wait()


async def _as_process(*argv: str) -> tuple[dict[str, Any], float]:
    """Run a command, return its JSON output and its wall time (ms, interpreter included)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    wall = (time.monotonic() - started) * 1e3
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:4])} failed ({proc.returncode}): "
                           f"{(out + err).decode(errors='replace')[-300:]}")
    return json.loads(out), wall


async def _run_isolated(case: Case, vm: FixtureVM, target: Path) -> dict[str, Any]:
    """The engine (the `liveupgrade` command) or the raw twin as a process of its own, so
    the heartbeat reader in this process never waits behind them: the pause is the
    guest's alone. wall_ms is the operation inside the process (as in-process runs
    report it); command_ms adds the interpreter's start."""
    if case.method == "liveupgrade":
        data, command_ms = await _as_process(
            sys.executable, "-m", "liveupgrade", "upgrade", str(vm.pid), "--to", str(target),
            "--mode", case.mode, "--json")
        result = UpgradeResult.from_json(data)
        return {**_engine_row(result, sum(result.phases_ms.values())), "command_ms": command_ms}
    figures, command_ms = await _as_process(
        sys.executable, "-m", "benchmarks.raw_qmp", str(vm.pid), str(vm.qmp_path), str(target),
        case.mode)
    return {**_raw_row(figures), "command_ms": command_ms}


def _engine_row(result: UpgradeResult, wall_ms: float) -> dict[str, Any]:
    return {"wall_ms": wall_ms, "qemu_downtime_ms": result.downtime_ms,
            "vcpu_pause_ms": result.vcpu_pause_ms, "qemu_total_ms": result.total_time_ms,
            "ram_transferred": result.ram_transferred_bytes}


def _raw_row(figures: dict[str, Any]) -> dict[str, Any]:
    return {"wall_ms": figures["wall_s"] * 1e3, "qemu_downtime_ms": figures["downtime_ms"],
            "vcpu_pause_ms": figures["vcpu_pause_ms"], "qemu_total_ms": figures["total_time_ms"],
            "ram_transferred": figures["ram_transferred"]}


async def _run_method(case: Case, vm: FixtureVM, fx: FixturePaths,
                      extra: list[subprocess.Popen[bytes]], isolated: bool = False
                      ) -> dict[str, Any]:
    _, target = binaries(fx, case.pair)
    if isolated and case.method in ("liveupgrade", "raw-qmp"):
        return await _run_isolated(case, vm, target)
    if case.method == "liveupgrade":
        t0 = time.monotonic()
        result = await engine.upgrade(vm.pid, target, mode=case.mode)
        return _engine_row(result, (time.monotonic() - t0) * 1e3)
    if case.method == "raw-qmp":
        figures, proc = await raw_upgrade(vm.argv(), vm.qmp_path, target, case.mode, vm.dir)
        if proc is not None:
            extra.append(proc)
        return _raw_row(figures)
    if case.method == "stop-cont":
        async with vm.qmp() as q:
            await q.execute("stop")
            await q.execute("cont")
        return {}
    if case.method == "save-restore":
        return await _save_restore(vm, target, extra)
    if case.method == "cold-restart":
        return await _cold_restart(vm, target, extra)
    raise ValueError(case.method)


def _restart_argv(vm: FixtureVM, target: Path, incoming: list[str]) -> list[str]:
    return [str(target), *vm.argv()[1:], *incoming]


async def _spawn(argv: list[str], extra: list[subprocess.Popen[bytes]]) -> None:
    from liveupgrade.target import clean_env
    extra.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=clean_env(),
                                  start_new_session=True))


async def _quit_and_wait(vm: FixtureVM) -> None:
    async with vm.qmp() as q:
        with contextlib.suppress(Exception):
            await q.execute("quit")
    assert vm.process is not None
    await vm.process.wait()


async def _save_restore(vm: FixtureVM, target: Path,
                        extra: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """What a cautious operator does today (virsh save/restore): pause, save the VM to a
    file, quit, restore it on the new binary, which resumes it."""
    state = vm.dir / "saved-state"
    async with vm.qmp() as q:
        await q.execute("stop")
        await q.execute("migrate-set-parameters", {"max-bandwidth": 100 * 1024**3})
        await q.execute("migrate", {"uri": f"exec:cat > {state}"})
        while (await q.execute("query-migrate"))["status"] not in ("completed", "failed"):  # type: ignore[index]
            await asyncio.sleep(0.01)
    await _quit_and_wait(vm)
    await _spawn(_restart_argv(vm, target, ["-incoming", f"exec:cat {state}"]), extra)
    # The state was saved paused, so QEMU restores it paused: resume it, as virsh restore does.
    while not vm.qmp_path.exists():
        await asyncio.sleep(0.002)
    client = await monitor.connect_new(vm.qmp_path, "bench-restore", within=60)
    try:
        while True:
            status: Any = await client.execute("query-status")
            if status["status"] == "paused":
                break
            await asyncio.sleep(0.005)
        await client.execute("cont")
    finally:
        await client.disconnect()
    await vm.heartbeat.wait_beats(1, 120)
    return {"state_file_mib": state.stat().st_size / 2**20}


async def _cold_restart(vm: FixtureVM, target: Path,
                        extra: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Quit, start the new binary, count until the guest's first heartbeat: a reboot."""
    await _quit_and_wait(vm)
    restart_at = time.monotonic()
    await _spawn(_restart_argv(vm, target, []), extra)
    await vm.heartbeat.wait_for(
        lambda log: bool(log.beats and log.beats[-1].host_time > restart_at), 120)
    return {"restart_at": restart_at}


def matrix(quick: bool) -> list[Case]:
    if quick:
        d, r = 50, 1
        return [Case("stop-cont", "-", r, d, "7.2->7.2"),
                Case("liveupgrade", "shared", r, d, "7.2->10.0"),
                Case("raw-qmp", "shared", r, d, "7.2->10.0"),
                Case("liveupgrade", "cpr-transfer", r, d, "10.0->10.0"),
                Case("raw-qmp", "cpr-transfer", r, d, "10.0->10.0"),
                Case("liveupgrade", "cpr-transfer", r, d, "10.0->11.1"),
                Case("raw-qmp", "cpr-transfer", r, d, "10.0->11.1"),
                Case("liveupgrade", "cpr-exec", r, d, "11.1->11.1"),
                Case("raw-qmp", "cpr-exec", r, d, "11.1->11.1"),
                Case("liveupgrade", "copy", r, d, "10.0->10.0"),
                Case("raw-qmp", "copy", r, d, "10.0->10.0"),
                Case("save-restore", "-", r, d, "7.2->10.0"),
                Case("cold-restart", "-", r, d, "7.2->10.0")]
    cases = []
    for dirty in (0, 50, 500):
        for ram in (1, 4, 16):
            cases.append(Case("stop-cont", "-", ram, dirty, "7.2->7.2"))
            for pair in ("7.2->10.0", "7.2->7.2", "10.0->10.0"):
                cases.append(Case("liveupgrade", "shared", ram, dirty, pair))
            cases.append(Case("raw-qmp", "shared", ram, dirty, "7.2->10.0"))
            cases.append(Case("liveupgrade", "cpr-transfer", ram, dirty, "10.0->10.0"))
            cases.append(Case("raw-qmp", "cpr-transfer", ram, dirty, "10.0->10.0"))
            if ram <= 4:
                cases.append(Case("liveupgrade", "copy", ram, dirty, "10.0->10.0"))
                cases.append(Case("raw-qmp", "copy", ram, dirty, "10.0->10.0"))
                cases.append(Case("save-restore", "-", ram, dirty, "7.2->10.0"))
            if dirty == 0:
                cases.append(Case("cold-restart", "-", ram, dirty, "7.2->10.0"))
    # Today's QEMU: 11.1 in each mode (cpr-exec needs >= 10.2 on both sides: 11.1 -> 11.1),
    # each beside its raw-QMP twin.
    for ram in (1, 4):
        for mode, pair in (("shared", "10.0->11.1"), ("cpr-transfer", "10.0->11.1"),
                           ("cpr-transfer", "11.1->11.1"), ("cpr-exec", "11.1->11.1"),
                           ("copy", "10.0->11.1")):
            cases += [Case(method, mode, ram, 50, pair) for method in ("liveupgrade", "raw-qmp")]
    lg = "linuxguest"
    cases += [Case("stop-cont", "-", 1, 50, "7.2->7.2", lg),
              Case("liveupgrade", "shared", 1, 50, "7.2->10.0", lg),
              Case("raw-qmp", "shared", 1, 50, "7.2->10.0", lg),
              Case("liveupgrade", "shared", 4, 50, "7.2->10.0", lg),
              Case("save-restore", "-", 1, 50, "7.2->10.0", lg),
              Case("cold-restart", "-", 1, 50, "7.2->10.0", lg)]
    return cases


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = {k for r in rows for k, v in r.items() if isinstance(v, int | float)}
    for key in sorted(keys):
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}
    return out


def machine_facts(fx: FixturePaths, accel: str) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    versions = {}
    for name, path in (("old", fx.qemu_old), ("new", fx.qemu_new), ("11.1", fx.qemu_11)):
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
        versions[name] = out.splitlines()[0] if out else "?"
    return {"cpu": cpu, "cores": psutil.cpu_count(), "memory_gib": round(
        psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release(), "accel": accel,
        "qemu": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def fmt(stat: dict[str, float] | None, digits: int = 1) -> str:
    if not stat:
        return "-"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def markdown(results: list[dict[str, Any]], facts: dict[str, Any], runs: int) -> str:
    lines = [f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB, "
             f"kernel {facts['kernel']}, accel {facts['accel']}; "
             f"{' / '.join(facts['qemu'].values())}; {facts['date']}; "
             f"median (min-max) of {runs} runs.", "",
             "| method | mode | RAM GiB | dirty MiB/s | versions | guest | guest pause ms | "
             "vCPU pause ms (STOP->RESUME) | QEMU downtime ms | QEMU total ms | wall ms | "
             "RAM sent MiB | extra host MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        c, s = r["case"], r["stats"]
        guest = c.get("guest", "microguest")
        if r.get("error"):
            lines.append(f"| {c['method']} | {c['mode']} | {c['ram_gib']} | {c['dirty_mib']} | "
                         f"{c['pair']} | {guest} | failed: {r['error'][:80]} | | | | | | |")
            continue
        sent = s.get("ram_transferred")
        sent_mib = ({k: v / 2**20 for k, v in sent.items()} if sent else None)
        lines.append(
            f"| {c['method']} | {c['mode']} | {c['ram_gib']} | {c['dirty_mib']} | {c['pair']} | "
            f"{guest} | {fmt(s.get('pause_ms'))} | {fmt(s.get('vcpu_pause_ms'))} | "
            f"{fmt(s.get('qemu_downtime_ms'), 0)} | "
            f"{fmt(s.get('qemu_total_ms'), 0)} | {fmt(s.get('wall_ms'), 0)} | "
            f"{fmt(sent_mib)} | {fmt(s.get('peak_extra_host_mib'), 0)} |")
    return "\n".join(lines) + "\n"


def plots(results: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for metric, title, fname in (("pause_ms", "guest-visible pause (ms)", "pause.png"),
                                 ("wall_ms", "wall time (ms)", "wall.png")):
        fig, ax = plt.subplots(figsize=(9, 5))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in results:
            c, s = r["case"], r["stats"]
            # One dirty rate and the microguest keep the plot readable; the table has all.
            if (r.get("error") or metric not in s or c["dirty_mib"] != PLOT_DIRTY_MIB
                    or c.get("guest", "microguest") != "microguest"):
                continue
            key = f"{c['method']} {c['mode']} {c['pair']}"
            series.setdefault(key, []).append((c["ram_gib"], s[metric]["median"]))
        styles = ["-", "--", ":", "-."]
        for i, (key, points) in enumerate(sorted(series.items())):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key,
                    linestyle=styles[i // 10 % len(styles)])
        ax.set_xlabel("guest RAM (GiB)")
        ax.set_ylabel(title)
        ax.set_title(f"microguest, {PLOT_DIRTY_MIB} MiB/s dirtying, TCG; median of runs")
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


async def main_async(args: argparse.Namespace) -> int:
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # retried connects are expected
    fx = find_fixtures()
    accel = (await decide_accel_async(fx.qemu_old)).accel
    cases = matrix(args.quick)
    if args.filter:
        cases = [c for c in cases if all(f in c.label for f in args.filter)]
    out = args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(fx, accel)
    results = []
    for i, case in enumerate(cases, 1):
        rows, error = [], None
        for _ in range(args.runs):
            try:
                rows.append(await measure(case, fx, accel, args.isolated))
            except Exception as e:  # a failed case is reported, the run goes on
                if args.debug:
                    raise
                error = f"{type(e).__name__}: {e}"
                break
        stats = summarize(rows)
        results.append({"case": dataclasses.asdict(case), "runs": rows, "stats": stats,
                        "error": error})
        pause = stats.get("pause_ms")
        print(f"[{i}/{len(cases)}] {case.label}: pause {fmt(pause)} ms, wall "
              f"{fmt(stats.get('wall_ms'), 0)} ms{'  ERROR ' + error if error else ''}",
              flush=True)
        (out / "results.json").write_text(json.dumps(
            {"machine": facts, "runs": args.runs, "results": results}, indent=1))
    table = markdown(results, facts, args.runs)
    (out / "table.md").write_text(table)
    made = [] if args.no_plots else plots(results, out)
    print(table)
    if args.quick and not args.filter:  # the whole command too, so CI shows a regression
        command_rows, command_table = await command.measure(max(args.runs, 5))
        (out / "command.json").write_text(json.dumps(command_rows, indent=1))
        (out / "command.md").write_text(command_table)
        print(command_table)
    print(f"results: {out} ({', '.join(p.name for p in made)})")
    return 1 if any(r["error"] for r in results) else 0


def publish(dirs: list[Path], docs: Path) -> None:
    """Merge results folders into docs/performance/: table.md, plots, results.json.

    A case measured again in a later folder replaces the earlier measurement.
    """
    merged: dict[str, dict[str, Any]] = {}
    facts: dict[str, Any] = {}
    runs = 0
    for d in dirs:
        data = json.loads((d / "results.json").read_text())
        for r in data["results"]:
            case = {"guest": "microguest", **r["case"]}
            r["case"] = case
            merged[json.dumps(case, sort_keys=True)] = r
        facts, runs = data["machine"], data["runs"]
    results = list(merged.values())
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(
        {"machine": facts, "runs": runs, "results": results}, indent=1))
    table = markdown(results, facts, runs)
    (docs / "table.md").write_text(table)
    plots(results, docs)
    print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI-sized set (< 3 minutes)")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--filter", action="append", help="only cases whose label has this text")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: benchmarks/results/TIME)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--isolated", action="store_true",
                        help="run liveupgrade (the command) and the raw twin as processes of "
                             "their own, so the heartbeat reader measures the guest alone")
    parser.add_argument("--debug", action="store_true", help="stop at the first failure")
    parser.add_argument("--publish", type=Path, nargs="+", metavar="RESULTS_DIR",
                        help="merge results folders into docs/performance/ and stop")
    parser.add_argument("--into", default="", metavar="SUBDIR",
                        help="with --publish: docs/performance/SUBDIR instead (a run on "
                             "another machine gets its own table, under its own facts)")
    args = parser.parse_args()
    if args.publish:
        publish(args.publish,
                Path(__file__).resolve().parents[1] / "docs" / "performance" / args.into)
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
