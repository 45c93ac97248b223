"""The journal and the per-VM lock, as pure logic (real files, keys of the test's own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from liveupgrade import journal
from liveupgrade.errors import LiveUpgradeError, Refused


@pytest.fixture
def key() -> Iterator[str]:
    """A transaction key no VM has; whatever the test leaves under it is removed."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    for path in journal.transactions_dir().glob(f"*{name}*"):
        path.unlink()


def test_vm_key_is_the_uuid_or_the_pid() -> None:
    assert journal.vm_key("ABCDEF01-2345-6789-abcd-ef0123456789", 42) == \
        "abcdef01-2345-6789-abcd-ef0123456789"
    assert journal.vm_key(None, 42) == "pid-42"
    assert journal.vm_key("../../etc/passwd", 42) == "pid-42"  # never a path from argv


def test_record_is_atomic_ordered_and_private(key: str) -> None:
    record = journal.Journal.begin(key, vm="web1", source={"pid": 1})
    record.record("planning", rundir="/run/x")
    record.record("destination-starting")
    loaded = journal.Journal.load(record.path)
    assert loaded.step == "destination-starting" and loaded.facts["rundir"] == "/run/x"
    assert [s for s, _ in loaded.facts["steps"]] == ["planning", "destination-starting"]
    assert loaded.reached("planning") and not loaded.reached(journal.POINT_OF_NO_RETURN)
    assert record.path.stat().st_mode & 0o777 == 0o600
    assert journal.transactions_dir().stat().st_mode & 0o777 == 0o700
    assert [p.name for p in journal.transactions_dir().glob(f"*{key}*")] == [f"{key}.journal"]
    assert key in [j.key for j in journal.journals()]
    record.remove()
    assert key not in [j.key for j in journal.journals()]


def test_a_journal_of_another_format_is_refused_not_guessed(key: str) -> None:
    path = journal.transactions_dir() / f"{key}.journal"
    path.write_text(json.dumps({"format": 99, "key": key, "step": "migrating"}))
    with pytest.raises(LiveUpgradeError, match="format 99"):
        journal.Journal.load(path)
    path.write_text("{half")
    with pytest.raises(LiveUpgradeError, match="cannot read"):
        journal.Journal.load(path)


def test_destination_is_recognised_by_its_run_folder_or_pid(key: str) -> None:
    record = journal.Journal.begin(key, vm="web1")
    record.record("planning", rundir=f"/run/liveupgrade/upgrade-{key}")
    argv = ["qemu", "-chardev", f"socket,id=liveupgrade-qmp,path=/run/liveupgrade/upgrade-{key}/q"]
    found = journal.destination_of(argv, 2**22 + 7)
    assert found is not None and found.key == key
    assert journal.destination_of(["qemu", "-name", "web1"], 2**22 + 7) is None
    record.update(destination={"pid": 2**22 + 7})
    found = journal.destination_of(["qemu"], 2**22 + 7)
    assert found is not None and found.key == key


def test_one_holder_at_a_time_and_the_refusal_names_it(key: str) -> None:
    in_progress = rf"upgrade of VM web1 is in progress \(PID {os.getpid()}\)"
    with journal.claimed(key, "web1") as lock:
        assert journal.VMLock.try_acquire(key) is None
        with pytest.raises(Refused, match=in_progress), journal.claimed(key, "web1"):
            pass
        assert lock.path.exists()
    assert not (journal.transactions_dir() / f"{key}.lock").exists()  # released and unlinked
    again = journal.VMLock.try_acquire(key)
    assert again is not None
    again.release()


def test_the_lock_outlives_the_engine_in_an_inheriting_process(key: str) -> None:
    """What the keeper relies on: the flock stays held while any holder of it lives."""
    lock = journal.VMLock.try_acquire(key)
    assert lock is not None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             pass_fds=[lock.fd])
    try:
        os.close(lock.fd)  # the engine's copy is gone; the child's keeps the lock
        lock.fd = -1
        time.sleep(0.1)
        assert journal.VMLock.try_acquire(key) is None
    finally:
        child.kill()
        child.wait()
    retaken = journal.VMLock.try_acquire(key)
    assert retaken is not None
    retaken.release()


def test_an_interrupted_transaction_refuses_a_new_upgrade(key: str) -> None:
    record = journal.Journal.begin(key, vm="web1")
    record.record("migrating")
    with pytest.raises(Refused, match="interrupted \\(at step 'migrating'\\)") as refusal, \
            journal.claimed(key, "web1"):
        pass
    assert refusal.value.fix == "run: liveupgrade recover web1"
    assert "interrupted" in journal.describe(record)


def test_the_fault_hook_fires_only_at_its_step() -> None:
    """In a child process: at another step it does nothing, at its own it signals."""
    code = ("from liveupgrade import journal; journal.fault_hook('migrating'); print('alive'); "
            "journal.fault_hook('switchover'); print('not reached')")
    env = {**os.environ, journal.FAULT_ENV: "switchover:KILL"}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert child.returncode == -9 and child.stdout == "alive\n"
    env.pop(journal.FAULT_ENV)
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert child.returncode == 0 and child.stdout == "alive\nnot reached\n"


async def test_a_record_of_processes_that_no_longer_exist_is_closed(key: str) -> None:
    """After a host reboot (or both QEMUs killed) there is nothing to repair; the record
    must not block a VM started again with the same UUID."""
    from liveupgrade import recovery

    gone = subprocess.Popen(["true"])
    gone.wait()
    record = journal.Journal.begin(key, vm="web1", source={
        "pid": gone.pid, "create_time": 1.0, "qmp_path": "/nonexistent", "running": True})
    record.record("migrating", rundir=f"/run/liveupgrade/upgrade-{key}",
                  destination={"pid": gone.pid, "create_time": 1.0, "qmp_path": "/none"})
    (repair,) = await recovery.recover(key)
    assert repair.ok and repair.action == "nothing left", repair
    assert not record.path.exists()
    with journal.claimed(key, "web1"):  # the VM can be upgraded again
        pass
