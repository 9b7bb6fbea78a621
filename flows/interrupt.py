"""Ctrl-C and SIGTERM during a flow run: the local workers are stopped first, then Prefect records the crash.

Prefect ends a flow run on SIGTERM (its handler raises TerminationSignal) or Ctrl-C
(KeyboardInterrupt) by unwinding the flow, and the task runner then waits for the tasks still
running: a worker process in the middle of a training step kept a terminated run alive for
minutes (issue 22). So while the flow runs, `stop_on_signal` puts a handler of both signals in
front of the one it replaces (Prefect's, or Python's KeyboardInterrupt):

1. the local worker processes are stopped (SIGTERM, then SIGKILL after WORKER_GRACE_S); they
   ignore SIGINT themselves (flows.runners.local_worker_setup), so a Ctrl-C that the terminal
   sends to the whole process group reaches them only this way; the task runs they were running,
   which nothing else would end, are set Crashed (flows.lease.crash_task_runs, TASK_RUNS_S at most);
2. the console is silenced (Prefect's crash lines still reach the UI) and the signal goes on to
   the replaced handler, so Prefect marks the flow run Crashed and the command ends (`lmsys run`:
   one `error:` line, exit 130 / 143);
3. a deadline bounds the rest: if the process still runs DEADLINE_S after the signal (a task in a
   thread of the thread runner cannot be stopped; a server that does not answer), the flow run is
   marked Crashed through the API, the root's lease released and the process exits 128 + signal.

A second signal exits at once (after stopping the workers again, briefly).
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Iterator

WORKER_GRACE_S = 3.0
TASK_RUNS_S = 5.0               # at most this long to mark the stopped workers' task runs Crashed
DEADLINE_S = 10.0
NAMES = {signal.SIGINT: "interrupted (Ctrl-C, SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}


def message(signum: int) -> str:
    """The one line a command stopped by `signum` ends with."""
    return (f"error: {NAMES.get(signum, f'signal {signum}')}: stopped; finished steps are kept (their outputs "
            "and cache) and a rerun resumes, training from its last checkpoint")


def stop_local_workers(grace_s: float = WORKER_GRACE_S) -> int:
    """Terminate this process's multiprocessing children (the local runner's workers); SIGKILL
    those still alive after `grace_s`. Returns how many there were."""
    children = multiprocessing.active_children()
    for p in children:
        with contextlib.suppress(OSError):
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in children:
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            p.join(1.0)
    return len(children)


def silence_console() -> None:
    """After a stop signal the console gets one line, the command's: every logger's stream handler
    (the CLI's, Prefect's console) is silenced; Prefect's API handler still sends the crash to the UI."""
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.CRITICAL + 1)


def _exit_after(signum: int, flow_run_id: str | None, deadline_s: float) -> None:
    """The deadline: still running `deadline_s` after the signal -> mark, release, exit."""
    time.sleep(deadline_s)
    stop_local_workers(0.5)
    if flow_run_id:                 # best effort, bounded: a slow API server must not hold the exit
        from flows.lease import mark_crashed
        marking = threading.Thread(target=mark_crashed, daemon=True, name="lmsys-mark-crashed", args=(
            flow_run_id, f"{NAMES.get(signum, signum)}: the run did not end within {deadline_s:g} s"))
        marking.start()
        marking.join(TASK_RUNS_S)
    from lmsys import lease
    lease.release_all()
    print(message(signum), file=sys.stderr, flush=True)
    os._exit(128 + signum)


@contextlib.contextmanager
def stop_on_signal(flow_run_id: str | None = None, deadline_s: float = DEADLINE_S) -> Iterator[None]:
    """For the block: SIGINT and SIGTERM stop the local workers first (see the module docstring).
    Outside the main thread (where no signal handler can be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    replaced: dict[int, object] = {}
    fired = threading.Event()

    def handler(signum, frame):
        if replaced[signum] == signal.SIG_IGN:      # ignored before this block: still ignored
            return
        again = fired.is_set()
        fired.set()
        silence_console()
        if again:
            stop_local_workers(0.5)
            print(message(signum), file=sys.stderr, flush=True)
            os._exit(128 + signum)
        threading.Thread(target=_exit_after, args=(signum, flow_run_id, deadline_s), daemon=True,
                         name="lmsys-signal-deadline").start()
        stop_local_workers()
        if flow_run_id:                             # the tasks the stopped workers ran: nothing else reports them
            from flows.lease import crash_task_runs
            marking = threading.Thread(target=crash_task_runs, args=(flow_run_id, f"{NAMES[signum]}: its worker "
                                       "was stopped"), daemon=True, name="lmsys-crash-task-runs")
            marking.start()
            marking.join(TASK_RUNS_S)
        before = replaced[signum]
        if callable(before):
            before(signum, frame)                   # Prefect's TerminationSignal, Python's KeyboardInterrupt
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)       # SIG_DFL before: die of the signal as before
        os.kill(os.getpid(), signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        replaced[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, before in replaced.items():
            signal.signal(s, before)
