"""The short chaos run of bench/chaos.py, two hosts on one database: jobs flow while children,
supervisors, PostgreSQL and the downstream fail, and every promise holds at the end."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chaos  # noqa: E402


def test_a_short_chaos_run_on_two_hosts_keeps_every_promise():
    rows, faults, broken = chaos.run(jobs=600, duration=30, hosts=2, outage=3, seed=20261129)
    table = "\n".join(f"{'ok    ' if ok else 'BROKEN'} {label}: {value}" for label, value, ok in rows)
    assert broken == 0, table
    assert len(faults) == 6, faults  # every kind of fault was injected
    assert faults["kill -9 child"] >= 3, faults  # one every 3 s, between the other faults
