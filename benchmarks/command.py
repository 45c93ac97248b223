"""The whole command as an operator runs it, side by side with a raw-QMP script.

Each sample is a whole process, timed from its start to its exit:

- `liveupgrade upgrade PID --to BINARY --json` (shared mode, QEMU 7.2 -> 10.0),
- `liveupgrade plan PID --to BINARY --json` (the dry run),
- `python -m benchmarks.raw_qmp ...`: the same upgrade with the fewest raw QMP
  steps (benchmarks/raw_qmp.py), the yardstick,

on a 512 MiB microguest with file-backed shared RAM, started fresh for each
sample (the probe cache is warmed first, as it is on a host after the first
upgrade). The upgrade's own phase timings (from its --json) are kept too, so
the difference between the whole command and the engine is visible.

    .venv/bin/python -m benchmarks.command [--runs 20] [--out DIR]

Writes command.json and command.md to DIR and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rig import FixturePaths, FixtureVM, MemoryBacking, VMConfig, find_fixtures
from rig.kvm import decide_accel_async

DEFAULT_OUT = Path(__file__).parent / "results" / "command"
TARGETS_MS = {"upgrade": 250.0, "plan": 150.0}  # issue 15's targets for the whole command
KINDS = ("upgrade", "plan", "raw-qmp")


def _config(fx: FixturePaths, accel: str) -> VMConfig:
    return VMConfig(binary=fx.qemu_old, ram_mib=512, backing=MemoryBacking.FILE, accel=accel,
                    fill_mib=64, dirty_rate_mib=20, name="lu-command-bench")


async def _timed(*argv: str) -> tuple[float, bytes]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    wall = (time.monotonic() - started) * 1e3
    if proc.returncode not in (0, None):
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {err.decode()}")
    return wall, out


async def sample(kind: str, fx: FixturePaths, accel: str) -> dict[str, Any]:
    """One whole-process run of `kind` on a fresh VM."""
    async with FixtureVM(_config(fx, accel), fx) as vm:
        target = str(fx.qemu_new)
        if kind == "raw-qmp":
            wall, _ = await _timed(sys.executable, "-m", "benchmarks.raw_qmp", str(vm.pid),
                                   str(vm.qmp_path), target, "shared")
            return {"kind": kind, "wall_ms": wall}
        wall, out = await _timed(sys.executable, "-m", "liveupgrade", kind, str(vm.pid),
                                 "--to", target, "--json")
        doc = json.loads(out)
        row: dict[str, Any] = {"kind": kind, "wall_ms": wall}
        if kind == "upgrade":
            assert doc["ok"] and doc["mode"] == "shared", doc
            row |= {f"phase_{k}_ms": v for k, v in doc["phases_ms"].items()}
            row["engine_ms"] = sum(doc["phases_ms"].values())
            row["vcpu_pause_ms"] = doc["vcpu_pause_ms"]
        return row


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def markdown(rows: list[dict[str, Any]], runs: int, accel: str) -> str:
    lines = [f"Whole commands as processes, shared mode 7.2 -> 10.0, 512 MiB microguest, "
             f"{accel}, warm probe cache; median (min-max) ms of {runs} runs, "
             f"{time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| command | wall ms | target | engine phases ms (sum) |", "|---|---|---|---|"]
    for kind in KINDS:
        of = [r for r in rows if r["kind"] == kind]
        target = TARGETS_MS.get(kind)
        met = target is not None and statistics.median(r["wall_ms"] for r in of) <= target
        verdict = "" if target is None else f"<= {target:.0f}: {'met' if met else 'NOT met'}"
        lines.append(f"| {kind} | {_stat([r['wall_ms'] for r in of])} | {verdict} | "
                     f"{_stat([r['engine_ms'] for r in of if 'engine_ms' in r])} |")
    ups = [r for r in rows if r["kind"] == "upgrade"]
    phases = sorted({k for r in ups for k in r if k.startswith("phase_")},
                    key=lambda k: list(ups[0]).index(k))
    lines += ["", "Engine phases of the upgrade (median ms): " + ", ".join(
        f"{p.removeprefix('phase_').removesuffix('_ms')} "
        f"{statistics.median(r[p] for r in ups if p in r):.1f}" for p in phases)]
    return "\n".join(lines) + "\n"


async def measure(runs: int) -> tuple[list[dict[str, Any]], str]:
    fx = find_fixtures()
    accel = (await decide_accel_async(fx.qemu_old)).accel
    await sample("plan", fx, accel)  # warms the probe cache of the target binary
    rows = []
    for _ in range(runs):
        for kind in KINDS:  # interleaved, so a slow moment of the host hits all alike
            rows.append(await sample(kind, fx, accel))
    return rows, markdown(rows, runs, accel)


async def main_async(args: argparse.Namespace) -> int:
    rows, text = await measure(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "command.json").write_text(json.dumps(rows, indent=1))
    (args.out / "command.md").write_text(text)
    print(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="samples of each command")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
