"""The run root's lease (lmsys.lease): one holder at a time, the holder named, dead holders taken over.

Real processes throughout: a holder is a `python -c` child that takes the lease and waits; "dead"
is that child SIGKILLed; "another machine" is a lease record naming another host.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmsys import lease

HOLDER = """
import sys, time
from lmsys import lease
with lease.hold(sys.argv[1], command="holder", flow_run_id="11111111-2222-3333-4444-555555555555"):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(root: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    p = start_holder(tmp_path)
    try:
        rec = lease.read(tmp_path)
        assert rec["pid"] == p.pid and rec["command"] == "holder"
        with pytest.raises(lease.RootLocked) as e:
            lease.Lease(tmp_path, "second").acquire()
        text = str(e.value)
        assert f"pid {p.pid} on {rec['host']}" in text and "`holder`" in text
        assert "flow run 11111111-2222-3333-4444-555555555555" in text and str(tmp_path) in text
        assert lease.read(tmp_path)["token"] == rec["token"]           # the holder's lease is untouched
    finally:
        p.kill()
        p.wait()


def test_a_dead_holders_lease_is_taken_over_at_once(tmp_path):
    p = start_holder(tmp_path)
    dead = lease.read(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    with lease.hold(tmp_path, command="next") as held:
        assert time.monotonic() - t0 < 2                                 # same machine: the pid says it, no waiting
        assert held.took_over["token"] == dead["token"] and f"process {p.pid}" in held.took_over["stale"]
        assert held.took_over["flow_run_id"] == "11111111-2222-3333-4444-555555555555"
        assert lease.read(tmp_path)["pid"] == os.getpid()
    assert lease.read(tmp_path) is None                                  # released on exit


def _foreign(root: Path, heartbeat_age_s: float) -> dict:
    """A lease of a process on another machine whose last heartbeat is `heartbeat_age_s` old."""
    now = time.time()
    rec = {"host": "node-elsewhere", "boot_id": "x", "pidns": "y", "pid": 4242, "pid_start": "1", "command": "lmsys run",
           "flow_run_id": None, "started": now - 600, "heartbeat": now - heartbeat_age_s,
           "heartbeat_s": lease.HEARTBEAT_S, "token": "foreign"}
    path = lease.lease_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


def test_another_machines_lease_holds_while_it_beats_and_is_taken_over_after_missed_beats(tmp_path):
    limit = lease.MISSED_HEARTBEATS * lease.HEARTBEAT_S
    _foreign(tmp_path, heartbeat_age_s=limit - 5)
    with pytest.raises(lease.RootLocked, match="pid 4242 on node-elsewhere"):
        lease.Lease(tmp_path, "next").acquire()
    _foreign(tmp_path, heartbeat_age_s=limit + 5)
    held = lease.Lease(tmp_path, "next").acquire()
    try:
        assert held.took_over["token"] == "foreign" and "no heartbeat for" in held.took_over["stale"]
    finally:
        held.release()


def test_the_heartbeat_is_refreshed_while_held(tmp_path):
    with lease.hold(tmp_path, heartbeat_s=0.1):
        first = lease.read(tmp_path)["heartbeat"]
        time.sleep(0.5)
        assert lease.read(tmp_path)["heartbeat"] > first


def test_a_lease_taken_over_meanwhile_is_lost_not_overwritten(tmp_path):
    """A holder that stalled past the stale limit finds its lease replaced: it stops, it does not write on."""
    with lease.hold(tmp_path, heartbeat_s=0.1) as held:
        _foreign(tmp_path, heartbeat_age_s=0)
        time.sleep(0.5)
        assert held.lost.is_set()
        with pytest.raises(lease.LeaseLost, match="node-elsewhere"):
            held.check()
        assert lease.read(tmp_path)["token"] == "foreign"
    assert lease.read(tmp_path)["token"] == "foreign"                  # release leaves another's lease alone


def test_holding_a_root_twice_in_one_process_reuses_the_lease(tmp_path):
    """`lmsys run` holds the root, then its flow holds it again naming the flow run."""
    with lease.hold(tmp_path, command="lmsys run") as outer:
        with lease.hold(tmp_path, flow_run_id="abc") as inner:
            assert inner is outer and lease.read(tmp_path)["flow_run_id"] == "abc"
        assert lease.read(tmp_path)["token"] == outer.record["token"]   # still held by the outer block
    assert lease.read(tmp_path) is None


def test_an_unwritable_root_is_refused_with_the_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(lease.RootLocked, match="cannot create"):
        lease.Lease(blocker, "x").acquire()
