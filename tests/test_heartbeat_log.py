"""Unit tests of the heartbeat parser and gap meter (pure logic, no QEMU)."""

from rig.heartbeat import HeartbeatLog


def fill(log: HeartbeatLog, times_and_seqs: list[tuple[float, int]]) -> None:
    for t, seq in times_and_seqs:
        log.add_line(t, f"HB {seq:x} {int(t * 1e6):x} 0 1 0")


def test_parses_both_guests_lines() -> None:
    log = HeartbeatLog()
    log.add_line(1.0, "BOOT 20 0 7d0 3fb80")
    log.add_line(1.1, "HB 1f 2bf771 a 2 0")
    log.add_line(1.2, "HB 20 2c26d3 b 2 0 34 1")
    log.add_line(1.3, "ERR 4d2 4d deadbeef 0")
    log.add_line(1.4, "HB zz garbage")
    assert [b.seq for b in log.beats] == [0x1F, 0x20]
    assert log.beats[1].disk_seq == 0x34 and log.beats[1].disk_errors == 1
    assert log.beats[0].disk_seq is None
    assert log.error_lines == ["ERR 4d2 4d deadbeef 0"] and log.other == ["HB zz garbage"]


def test_max_gap_includes_the_first_beat_after_the_window() -> None:
    log = HeartbeatLog()
    fill(log, [(0.0, 0), (0.01, 1), (0.02, 2), (0.15, 3), (0.16, 4)])
    gap = log.max_gap(0.0, 0.03)
    assert abs(gap.seconds - 0.13) < 1e-9
    assert gap.before is not None and gap.before.seq == 2


def test_sequence_faults_name_skips_and_repeats() -> None:
    log = HeartbeatLog()
    fill(log, [(0.0, 0), (0.1, 1), (0.2, 3), (0.3, 3), (0.4, 4)])
    assert log.sequence_faults() == ["seq 0x1 -> 0x3", "seq 0x3 -> 0x3"]


def test_max_gap_includes_the_last_beat_before_the_window() -> None:
    log = HeartbeatLog()
    fill(log, [(0.0, 0), (0.01, 1), (0.05, 2), (0.06, 3)])
    gap = log.max_gap(0.02, 0.03)  # no beat inside: the pause spans the whole window
    assert abs(gap.seconds - 0.04) < 1e-9
