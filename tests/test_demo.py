"""The README's main job: `python -m liveupgrade demo`, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("mode", "versions"), [("auto", ("7.2", "10.0")),
                                                ("cpr-exec", ("11.1", "11.1"))])
def test_the_demo_upgrades_a_real_guest_and_reports_its_pause(mode: str,
                                                              versions: tuple[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "liveupgrade", "demo", "--ram", "256",
                           "--mode", mode, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    upgrade = out["upgrade"]
    assert out["ok"] and out["memory_errors"] == 0 and out["sequence_faults"] == []
    assert out["uuid_before"] == out["uuid_after"] and out["heartbeats_checked"] > 100
    assert upgrade["source_version"].startswith(versions[0])
    assert upgrade["target_version"].startswith(versions[1])
    # Measured from outside the guest; the bounds only say it is a pause, not a reboot.
    assert 0 < out["pause_ms"] < 2000 and upgrade["vcpu_pause_ms"] > 0
    if mode == "cpr-exec":
        assert upgrade["destination_pid"] == upgrade["source_pid"]
