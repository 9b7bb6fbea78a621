"""The lease on a run root: one run (or step command) writes a root at a time.

Two runs on one root would train the same tasks in the same `.partial` directories and serve each
other half-finished cache entries. So whatever writes a root holds its lease for as long as it
runs: the file <root>/artifacts/.lease.json naming the holder (host, pid, the flow run, the
command, since when) and a heartbeat that a thread of the holder refreshes every `heartbeat_s`.

- Created whole or not at all: the record is written to a temp file, then hard-linked to the lease
  name, which fails when the name exists (atomic also on NFS, where O_EXCL was not always; O_EXCL is
  the fallback where a filesystem has no hard links). So it works across the nodes of a cluster
  that share the root.
- A second holder is refused (RootLocked, exit 2) with the holder named, unless the lease is
  stale: its process is gone (same host, boot and pid namespace: the pid is checked at once) or, on
  another machine, its heartbeat is older than MISSED_HEARTBEATS intervals (the nodes' clocks must
  agree to a few seconds, as NTP keeps them). A stale lease is taken over; `Lease.took_over` is the
  dead holder's record, so the caller can warn and mark its flow run Crashed (flows.lease).
- Reentrant within a process: `lmsys run` takes the lease before the flow starts, and the flow
  (which deployment runs start without the CLI) takes it again, adding its flow-run id.
- The heartbeat thread checks that the lease is still its own before each refresh; when another
  process took it over (this one stalled for longer than the stale limit), `lost` is set and
  `check()` raises LeaseLost instead of both writing the root.

No Prefect here: the flow passes its flow-run id (flows/pipeline.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

LEASE_FILE = Path("artifacts") / ".lease.json"     # under the run root
HEARTBEAT_S = 5.0
MISSED_HEARTBEATS = 6                               # a lease is stale after this many missed heartbeats (30 s)
TAKEOVER_STALE_S = 60.0                             # a takeover mutex left by a process that died while taking over


class RootLocked(ValueError):
    """The root's lease is held by a live holder (exit 2: run elsewhere or wait)."""


class LeaseLost(RuntimeError):
    """Another process took this process's lease over (this one had stopped refreshing it)."""


# ---------------------------------------------------------------- who and where

def _read_first(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), "" if unknown:
    with the boot id it tells a live holder from a later process that reuses its pid."""
    stat = _read_first(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


def _machine() -> dict:
    """Host, boot and pid namespace of this process: a pid means the same process only when all three agree."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot_id": _read_first("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _alive(pid: int, start: str) -> bool:
    """Is process `pid` (started at `start`, when known) running here? A zombie is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _read_first(f"/proc/{pid}/stat")
    if not stat:
        return True                                 # no /proc: the signal answered
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] != "Z" and (not start or fields[19] == start)


def stale_reason(rec: dict, now: float | None = None) -> str | None:
    """Why the lease `rec` no longer holds (its process is gone, or its heartbeat stopped), or None."""
    here = _machine()
    if all(rec.get(k) == here[k] for k in ("host", "boot_id", "pidns")):
        if not _alive(int(rec["pid"]), rec.get("pid_start", "")):
            return f"process {rec['pid']} on {rec['host']} is gone"
        return None
    if rec.get("host") == here["host"] and rec.get("boot_id") != here["boot_id"]:
        return f"{rec['host']} has rebooted since"
    age = (time.time() if now is None else now) - float(rec.get("heartbeat", 0))
    limit = MISSED_HEARTBEATS * float(rec.get("heartbeat_s", HEARTBEAT_S))
    if age > limit:
        return f"no heartbeat for {age:.0f} s (stale after {limit:.0f} s)"
    return None


def describe(rec: dict, now: float | None = None) -> str:
    """The holder in words: pid, host, command, flow run, since when, last heartbeat."""
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec.get("started", now))))
    run = f", flow run {rec['flow_run_id']}" if rec.get("flow_run_id") else ""
    command = str(rec.get("command", "?"))
    command = command if len(command) <= 60 else command[:57] + "..."
    return (f"pid {rec.get('pid')} on {rec.get('host')} (`{command}`{run}, since {since}, "
            f"last heartbeat {now - float(rec.get('heartbeat', now)):.0f} s ago)")


def lease_path(root: str | Path) -> Path:
    return Path(root) / LEASE_FILE


def read(root: str | Path) -> dict | None:
    """The lease record of `root`, or None when there is none (or it cannot be parsed yet)."""
    try:
        return json.loads(lease_path(root).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- creating the file

def _write_temp(path: Path, rec: dict) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _create(path: Path, rec: dict) -> bool:
    """Create `path` holding `rec`, whole, unless it exists: True when this call created it."""
    tmp = _write_temp(path, rec)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        try:                                        # no hard links here: O_EXCL
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _takeover_mutex(path: Path) -> Iterator[bool]:
    """Only one process at a time may remove a stale lease: yields whether this one may."""
    mutex = path.with_name(path.name + ".takeover")
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}
    got = _create(mutex, rec)
    if not got:
        try:
            held = json.loads(mutex.read_text())
            if time.time() - float(held.get("at", 0)) > TAKEOVER_STALE_S:    # its taker died mid-takeover
                mutex.unlink(missing_ok=True)
                got = _create(mutex, rec)
        except (OSError, ValueError):
            pass
    try:
        yield got
    finally:
        if got:
            mutex.unlink(missing_ok=True)


# ---------------------------------------------------------------- the lease

class Lease:
    """The lease of one root held by this process (see the module docstring). Use `hold()`."""

    def __init__(self, root: str | Path, command: str, flow_run_id: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S):
        self.root, self.path = Path(root), lease_path(root)
        self.heartbeat_s = heartbeat_s
        self.took_over: dict | None = None         # the dead holder's record, when this lease replaced one
        self.announced = False                     # whether took_over has been said (flows.lease)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        now = time.time()
        self.record = {**_machine(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "command": command,
                       "flow_run_id": flow_run_id, "started": now, "heartbeat": now, "heartbeat_s": heartbeat_s,
                       "token": uuid.uuid4().hex}

    def acquire(self, tries: int = 5) -> "Lease":
        """Take the lease, taking over a stale one. Raises RootLocked naming a live holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RootLocked(f"{self.root}: cannot create {self.path.parent}: {e.strerror}") from None
        for _ in range(tries):
            try:
                if _create(self.path, self.record):
                    break
            except OSError as e:
                raise RootLocked(f"{self.root}: cannot write the run lease {self.path}: {e.strerror}") from None
            other = read(self.root)
            if other is None:                       # removed meanwhile, or being written by the O_EXCL fallback
                time.sleep(0.2)
                continue
            why = stale_reason(other)
            if why is None:
                raise RootLocked(f"{self.root} is in use by {describe(other)}: wait for it to finish, stop it, "
                                 f"or use another --root")
            with _takeover_mutex(self.path) as mine:
                if mine and (read(self.root) or {}).get("token") == other.get("token"):
                    self.path.unlink(missing_ok=True)
                    self.took_over = {**other, "stale": why}
            time.sleep(0.05)
        else:
            raise RootLocked(f"{self.root}: could not take the run lease {self.path} (another process keeps "
                             f"taking it: {describe(read(self.root) or {})})")
        self._thread = threading.Thread(target=self._beat, name="lmsys-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def set_flow_run(self, flow_run_id: str) -> None:
        """Name the flow run that holds the root (the flow adds it to the lease `lmsys run` took)."""
        with self._lock:
            self.record["flow_run_id"] = flow_run_id
        self._refresh()

    def _refresh(self) -> None:
        with self._lock:
            if self.lost.is_set():
                return
            now = read(self.root)
            if now is not None and now.get("token") != self.record["token"]:
                self.lost.set()
                print(f"error: {self.root}: this run's lease was taken over by {describe(now)}; this run "
                      "stops writing the root", file=sys.stderr)
                return
            self.record["heartbeat"] = time.time()
            try:
                tmp = _write_temp(self.path, self.record)
                os.replace(tmp, self.path)
            except OSError:
                pass                                # a full or flaky disk: the next beat tries again

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._refresh()

    def check(self) -> None:
        """Raise LeaseLost when another process took this lease over."""
        if self.lost.is_set():
            raise LeaseLost(f"{self.root}: the run lease was taken over by {describe(read(self.root) or {})}")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file, if it is still this process's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s + 1)
        with self._lock:
            now = read(self.root)
            if now is not None and now.get("token") == self.record["token"]:
                self.path.unlink(missing_ok=True)


# Leases held by this process, by resolved root: a nested hold() of the same root reuses the lease.
_HELD: dict[str, list] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def hold(root: str | Path, command: str | None = None, flow_run_id: str | None = None,
         heartbeat_s: float = HEARTBEAT_S) -> Iterator[Lease]:
    """Hold the lease of `root` for the block (see the module docstring). Within a process the same
    root can be held again (the flow inside `lmsys run`): the inner hold reuses the lease, adding
    `flow_run_id` when the outer one had none. Raises RootLocked naming a live holder."""
    key = str(Path(root).resolve())
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is None:
            lease = Lease(root, command or " ".join(["lmsys", *sys.argv[1:]]), flow_run_id, heartbeat_s).acquire()
            entry = _HELD[key] = [lease, 0]
        entry[1] += 1
    lease = entry[0]
    if flow_run_id and not lease.record.get("flow_run_id"):
        lease.set_flow_run(flow_run_id)
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                _HELD.pop(key, None)
                lease.release()


def release_all() -> None:
    """Remove every lease this process holds (before an exit that skips the context managers)."""
    with _HELD_LOCK:
        for lease, _ in _HELD.values():
            lease.release()
        _HELD.clear()


def held(root: str | Path) -> Lease | None:
    """This process's lease of `root`, if it holds one."""
    entry = _HELD.get(str(Path(root).resolve()))
    return entry[0] if entry else None
