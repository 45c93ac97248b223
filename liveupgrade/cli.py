"""`liveupgrade` / `python -m liveupgrade`: the operator's command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from liveupgrade import __version__, ramconvert
from liveupgrade.apthook import POLICY, REPORT, SNIPPET
from liveupgrade.bugs import KNOWN_BUGS
from liveupgrade.errors import LiveUpgradeError, UsageError
from liveupgrade.modes import Mode
from liveupgrade.preflight import FORCEABLE
from liveupgrade.progress import ProgressDisplay

DESCRIPTION = """\
Upgrade the QEMU binary under a running VM on the same host, without
rebooting the guest: the VM is migrated into a new QEMU process started from
its own command line (same -uuid, same versioned machine type) and handed
the old process's tap devices and listening sockets (QMP, consoles, VNC), so
network connections and clients carry on; then the old process is retired.
libvirt VMs need --libvirt-adopt (see docs/libvirt.md)."""

UPGRADE_HELP = """\
SOURCE is the VM: a PID, the path of its QMP socket, or its -name.

modes:
  auto          the best safe mode for this VM (default): cpr-transfer, then
                shared, then copy
  shared        RAM stays in its share=on memory-backend-file; only device
                state moves (x-ignore-shared). Pause: milliseconds.
  cpr-transfer  QEMU >= 10.0 on both sides: RAM file descriptors are passed
                to the new process. Needs share=on backends and
                -machine aux-ram-share=on.
  copy          RAM is copied over a private unix socket (multifd where both
                sides have it). Works for any VM; takes seconds per GiB.
  cpr-exec      QEMU >= 10.2 on both sides, never chosen by auto: the VM's own
                process execs the new QEMU and keeps its PID (pidfiles, cgroups
                stay valid). Needs what cpr-transfer needs; refused under
                -sandbox spawn=deny, with vhost-net and for libvirt VMs. The new
                QEMU is first rehearsed on the VM's command line; once the exec
                is done there is no old process to fall back to. Pause: tens of
                ms (the new QEMU starts inside it).

devices:
  Taps (-netdev tap, by name, created by QEMU, or passed as fd=) and listening
  unix sockets are handed over with pidfd_getfd (root); VNC switches to the old
  listening socket right after switchover; -D logs are appended to. A
  multiqueue tap gets fresh queues on the same device. SPICE, multiqueue with
  vhost-net and legacy -net tap are refused (plan: the fd-handover check).

safety:
  Until the new QEMU runs the guest, the old one stays in charge: any error,
  --timeout, Ctrl-C or SIGTERM cancels the migration, leaves the guest
  running on the old QEMU as before, and removes the half-started new one.
  The new QEMU is started paused (-S -incoming defer) and resumed only after
  the old one has stopped: never two running copies of a guest.

exit status:
  0 upgraded; 1 refused or failed (the VM runs on the old QEMU, unless the
  message says otherwise); 2 bad usage (unknown VM, wrong binary, bad option).

Before anything starts, the checks `liveupgrade plan` shows are run; any
failure refuses the upgrade (exit 1) unless overridden by name with --force.

examples:
  liveupgrade upgrade 4242 --to /usr/bin/qemu-system-x86_64
  liveupgrade upgrade --all-stale --parallel 2
  liveupgrade upgrade /run/vm/web1.qmp --to /opt/qemu-10.0/bin/qemu-system-x86_64 --json
  liveupgrade upgrade web1 --to /usr/bin/qemu-system-x86_64 --mode copy --bandwidth 2000
  liveupgrade upgrade web1 --to /usr/bin/qemu-system-x86_64 --libvirt-adopt   # a libvirt VM
  liveupgrade upgrade web1 --to /usr/bin/qemu-system-x86_64 \\
      --set disk0.file=/srv/images/web1-copy.qcow2
"""

DEMO_HELP = """\
Boots a fixture guest (built by ./setup.sh) on QEMU 7.2 with 1 GiB of RAM in
a shared file, lets it fill and verify 256 MiB of memory while it dirties
50 MiB/s, upgrades it live to QEMU 10.0, and prints the pause the guest saw
(the largest gap between its heartbeats, measured on the host) beside
QEMU's own downtime figure. It then checks that the heartbeat counter has no
gap, that the guest found no memory errors in a full verify pass on the new
QEMU, and that the UUID is unchanged. Exit status 0 only if all hold.

The upgrade runs as its own `liveupgrade upgrade ... --json` process, as an
operator runs it, so the demo's heartbeat reader is never held up by it.
--mode picks a guest that mode can move: shared (and auto) 7.2 -> 10.0 on
file RAM; cpr-transfer 10.0 -> 11.1 and cpr-exec 11.1 -> 11.1 on memfd RAM
with aux-ram-share=on; copy 10.0 -> 11.1 on anonymous RAM.
"""


def _positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    return parse


LIST_HELP = """\
Lists every QEMU process on this host: PID, -name, UUID, binary, version (asked
over QMP when the monitor is free), whether it is stale, its QMP socket, how
its RAM is backed, and the upgrade modes possible for it.

A VM is stale when its binary on disk was deleted or replaced (a package
upgrade), or a shared library it has mapped was, as needrestart decides.
"""

PLAN_HELP = f"""\
Changes nothing. Prints the checks `upgrade` would run, each PASS or FAIL with
the fix, the mode it would choose and why, the destination's command line,
and the paths it would move into place. Exit status 0 if the upgrade could
proceed, 1 if it would be refused, 2 for bad usage.

checks that can be overridden with --force NAME: {', '.join(sorted(FORCEABLE))};
and the known QEMU bugs ({', '.join(sorted(KNOWN_BUGS))}). Every other check
guards the guest's safety and cannot be forced.
"""

APT_HOOK_HELP = f"""\
Runs liveupgrade after apt: `install` writes {SNIPPET} (a DPkg::Post-Invoke
hook) and, if missing, the policy {POLICY}:

  action    off | report | upgrade: what to do when a dpkg run left VMs on a
            replaced QEMU binary or library (default: report)
  modes     the modes an unattended upgrade may use (default: shared,
            cpr-transfer); a VM that needs another is reported, not upgraded
  parallel  upgrades at a time; timeout  seconds before one rolls back

The hook never fails or holds up apt: it decides in a fraction of a second and
hands upgrades to a detached process. What it found and did is appended to
{REPORT} and sent to syslog where one listens. `remove` takes the snippet out
(policy and report stay); `status` shows both and the report's last line.
"""

METRICS_HELP = """\
Prints (or writes with --textfile, replacing the file atomically) the state of
this host's QEMUs in node_exporter's textfile-collector format: how many VMs
and how many run stale code; per VM its QEMU version, whether it is stale,
whether an upgrade of it was interrupted; and its last upgrade's outcome, time,
vCPU pause (QEMU's STOP -> RESUME events) and QEMU downtime. Run it from cron
or a timer with --textfile in node_exporter's --collector.textfile.directory.

examples:
  liveupgrade metrics
  liveupgrade metrics --textfile /var/lib/prometheus/node-exporter/liveupgrade.prom
"""

RECOVER_HELP = """\
Repairs upgrades that were interrupted: the liveupgrade process that ran them
died (killed, out of memory, host tool upgraded mid-way) and so did its keeper,
the small process each upgrade starts to finish the job if the command dies.
Each upgrade writes a journal (/run/liveupgrade/liveupgrade-transactions/) before
every step; from it and from the new QEMU's own run state, recover decides:

  before switchover   roll back: kill the new QEMU, cancel the migration,
                      resume the guest on the old QEMU if it ran, give back
                      migration settings, restart the libvirt daemon;
  at switchover       roll forward if the new QEMU holds the whole VM state
                      (resume it), else roll back as above;
  after switchover    roll forward: kill the old QEMU, move sockets and
                      pidfile into place, rebind VNC, hand the VM to libvirt.

The new QEMU is always killed before the old one is resumed: never two running
copies. An upgrade still in progress (its lock held) is left alone.
`liveupgrade list` shows interrupted upgrades.

exit status:
  0 every VM repaired (or nothing to repair); 1 a repair failed or an upgrade
  is still in progress; 2 bad usage (no interrupted upgrade of that VM).

examples:
  liveupgrade recover --all
  liveupgrade recover web1 --json
"""


def _add_transfer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", dest="target", metavar="BINARY",
                   help="the new QEMU binary (a qemu-system-* or a wrapper that execs one)")
    p.add_argument("--mode", default="auto", choices=[m.value for m in Mode],
                   help="how to hand over guest RAM (default: auto)")
    p.add_argument("--bandwidth", type=_positive(float), metavar="MiB/s",
                   help="cap the copy rate (default: unlimited; local socket)")
    p.add_argument("--downtime-limit", type=_positive(int), default=100, metavar="MS",
                   help="QEMU's target for the final stop-and-copy (default: 100)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="ID.KEY=VALUE",
                   help="change a host-side property for the new QEMU, e.g. a drive's "
                        "file= to a bit-identical copy (repeatable)")
    p.add_argument("--force", action="append", default=[], metavar="NAME",
                   help="override a named non-safety check or accept a known QEMU bug "
                        f"(repeatable): {', '.join(sorted(FORCEABLE | set(KNOWN_BUGS)))}")
    p.add_argument("--convert-ram", nargs="?", const="", default=None,
                   metavar="memfd|FOLDER",
                   help="copy anonymous guest RAM onto shareable memory with the same RAM "
                        "block ids, so every later upgrade of the VM is zero-copy: memfd "
                        "(+aux-ram-share=on; next upgrade cpr-transfer; the default for a "
                        "QEMU >= 10.0 target) or named files in FOLDER (next upgrade shared; "
                        f"default {ramconvert.DEFAULT_FOLDER}, made 0700, for older "
                        "targets). Implies --mode copy; plan shows the extra memory")
    p.add_argument("--libvirt-adopt", action="store_true",
                   help="for a libvirt-managed VM: stop the libvirt daemon during the upgrade "
                        "and restart it on the new QEMU (relies on libvirt internals; tested "
                        "with libvirt 9.0; see docs/libvirt.md)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON document on stdout, no progress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveupgrade", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"liveupgrade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    up = sub.add_parser("upgrade", help="move a running VM into a new QEMU binary",
                        description=UPGRADE_HELP, formatter_class=raw)
    up.add_argument("source", metavar="SOURCE", nargs="?",
                    help="PID, QMP socket path, or -name of the VM")
    up.add_argument("--all-stale", action="store_true",
                    help="upgrade every stale VM (see `list`); without --to each goes to the "
                         "binary now at its own path")
    up.add_argument("--parallel", type=_positive(int), default=1, metavar="N",
                    help="with --all-stale: upgrade N VMs at a time (default 1)")
    up.add_argument("--timeout", type=_positive(float), default=600.0, metavar="SECONDS",
                    help="give up and roll back if switchover is not reached (default: 600)")
    _add_transfer_options(up)

    pl = sub.add_parser("plan", help="dry run: every preflight check, the mode, the command line",
                        description=PLAN_HELP, formatter_class=raw)
    pl.add_argument("source", metavar="SOURCE", help="PID, QMP socket path, or -name of the VM")
    _add_transfer_options(pl)

    rc = sub.add_parser("recover", help="repair upgrades interrupted by the death of the tool",
                        description=RECOVER_HELP, formatter_class=raw)
    rc.add_argument("source", metavar="VM", nargs="?",
                    help="the VM: its -name, UUID, or the PID of its old or new QEMU")
    rc.add_argument("--all", action="store_true", help="every interrupted upgrade on this host")
    rc.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    ah = sub.add_parser("apt-hook", help="act after apt replaced QEMU: install, remove, status",
                        description=APT_HOOK_HELP, formatter_class=raw)
    ah.add_argument("action", choices=["install", "remove", "status", "run"],
                    help="install/remove the apt snippet, show its status; `run` is what apt "
                         "calls after each dpkg run")
    ah.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    mt = sub.add_parser("metrics", help="the host's QEMUs and last upgrades, for Prometheus",
                        description=METRICS_HELP, formatter_class=raw)
    mt.add_argument("--textfile", type=Path, metavar="PATH",
                    help="write to PATH (replaced atomically) instead of stdout, e.g. "
                         "/var/lib/prometheus/node-exporter/liveupgrade.prom")

    ls = sub.add_parser("list", help="every QEMU on this host, and which run stale code",
                        description=LIST_HELP, formatter_class=raw)
    ls.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    demo = sub.add_parser("demo", help="live-upgrade a fixture guest 7.2 -> 10.0 and measure",
                          description=DEMO_HELP, formatter_class=raw)
    demo.add_argument("--guest", choices=["micro", "linux"], default="micro",
                      help="microguest (boots in ~0.1 s) or linuxguest (Debian kernel, disk)")
    demo.add_argument("--ram", type=_positive(int), default=1024, metavar="MiB",
                      help="guest RAM (default: 1024)")
    demo.add_argument("--mode", default="auto", choices=[m.value for m in Mode])
    demo.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    return parser


CANCELLING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def _with_signals(coro: Awaitable[Any]) -> Any:
    """Run coro; SIGTERM and SIGHUP (the operator's terminal or SSH session gone) cancel
    it like Ctrl-C does, so the engine rolls back (or, past switchover, finishes)."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in CANCELLING_SIGNALS:
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    finally:
        for sig in CANCELLING_SIGNALS:
            loop.remove_signal_handler(sig)


def _fail(args: argparse.Namespace, message: str, fix: str, code: int) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message, "fix": fix, "exit_code": code}))
    else:
        print(f"liveupgrade: error: {message}", file=sys.stderr)
        if fix:
            print(textwrap.indent(f"fix: {fix}", "  "), file=sys.stderr)
    return code


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


async def _run(args: argparse.Namespace, display: ProgressDisplay) -> tuple[Any, str, bool]:
    """Run one command; return its JSON document, its text, and whether it succeeded."""
    options: dict[str, Any] = {}
    if args.command in ("upgrade", "plan"):
        options = {"mode": args.mode, "bandwidth": args.bandwidth,
                   "downtime_limit": args.downtime_limit, "overrides": args.overrides,
                   "force": args.force, "libvirt_adopt": args.libvirt_adopt,
                   "convert_ram": args.convert_ram}
    if args.command == "list":
        from liveupgrade import inventory

        vms = await inventory.list_vms()
        if not args.json:
            _table("QEMU processes", ["PID", "name", "version", "stale", "QMP / manager", "RAM",
                                      "modes / upgrade"],
                   [[str(v.pid), v.name or "-", v.version or "?",
                     "yes: " + "; ".join(v.stale_reasons) if v.stale else "no",
                     v.managed_by or v.qmp or "-", v.memory,
                     ", ".join(v.modes) or "none" if v.upgrade is None else v.upgrade]
                    for v in vms])
        return [v.to_json() for v in vms], "", True
    if args.command == "recover":
        return await _recover(args)
    if args.command == "apt-hook":
        from liveupgrade import apthook

        if args.action == "run":
            await apthook.run()
            return None, "", True
        if args.action == "status":
            state = apthook.status()
            return state, "\n".join(f"{k}: {v}" for k, v in state.items()), True
        done = apthook.install() if args.action == "install" else apthook.remove()
        return {"done": done}, "\n".join(done), True
    if args.command == "metrics":
        from liveupgrade import metrics

        text = await metrics.collect()
        if args.textfile is None:
            return None, text.rstrip("\n"), True
        metrics.write_atomically(args.textfile, text)
        return None, "", True
    from liveupgrade import engine

    if args.command == "plan":
        if not args.target:
            raise UsageError("plan needs --to BINARY")
        report = await engine.plan(args.source, args.target, **options)
        return report.to_json(), report.render(), report.ok
    if args.command == "upgrade" and args.all_stale:
        if args.source:
            raise UsageError("give either SOURCE or --all-stale, not both")
        from liveupgrade import fleet

        outcomes = await fleet.upgrade_all_stale(
            Path(args.target) if args.target else None, args.parallel, on_event=display,
            timeout=args.timeout, **options)
        if not args.json:
            _table(f"{len(outcomes)} stale VM(s)", ["PID", "name", "target", "result"],
                   [[str(o.vm.pid), o.vm.name or "-", o.target,
                     f"ok: {o.result.mode}, PID {o.result.destination_pid}, guest paused "
                     f"{o.result.vcpu_pause_ms} ms, QEMU downtime {o.result.downtime_ms} ms"
                     if o.result else f"FAILED: {o.error}"]
                    for o in outcomes])
        return [o.to_json() for o in outcomes], "", all(o.result for o in outcomes)
    if args.command == "upgrade":
        if not args.source or not args.target:
            raise UsageError("upgrade needs SOURCE and --to BINARY (or --all-stale)")
        result = await engine.upgrade(args.source, args.target, timeout=args.timeout,
                                      on_event=display, **options)
        return {"ok": True, **result.to_json()}, result.summary(), True
    from liveupgrade.demo import run_demo
    outcome = await run_demo(guest=args.guest, ram_mib=args.ram, mode=args.mode,
                             on_event=display)
    return outcome.to_json(), outcome.summary(), outcome.ok


async def _recover(args: argparse.Namespace) -> tuple[Any, str, bool]:
    from liveupgrade import recovery

    if bool(args.source) == bool(args.all):
        raise UsageError("recover needs a VM or --all (not both)",
                         "liveupgrade recover --all, or liveupgrade recover NAME")
    repairs = await recovery.recover(args.source)
    text = "\n".join(r.summary() for r in repairs) or "no interrupted upgrades on this host"
    return ([r.to_json() for r in repairs], text,
            all(r.ok and r.action != "in progress" for r in repairs))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except OSError as e:  # printing failed: the terminal (SIGHUP) or the pipe went away
        if e.errno in (errno.EIO, errno.EPIPE):
            return 1
        raise


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    display = ProgressDisplay(enabled=not getattr(args, "json", False))
    try:
        with display:
            output, text, ok = asyncio.run(_with_signals(_run(args, display)))
        if getattr(args, "json", False):
            print(json.dumps(output, indent=2))
        elif text:
            print(text)
        return 0 if ok else 1
    except LiveUpgradeError as e:
        return _fail(args, str(e), e.fix, e.exit_code)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return _fail(args, "interrupted before switchover: the migration was cancelled and the "
                     "VM runs on the old QEMU, as before", "", 1)
    except OSError as e:
        if e.errno in (errno.EIO, errno.EPIPE):
            raise
        return _fail(args, f"the host refused an operation: {e}", "", 1)
    except Exception as e:  # a bug of ours: say so in one line, never a traceback unasked
        if os.environ.get("LIVEUPGRADE_DEBUG"):
            raise
        return _fail(args, f"internal error: {type(e).__name__}: {e}",
                     "please report it; LIVEUPGRADE_DEBUG=1 shows the traceback", 1)
