"""The Prefect side of the run lease (lmsys.lease): holding a root, and flow runs whose process died.

A flow run whose process is SIGKILLed (or whose node is lost) cannot report its end: Prefect keeps
it, and its task runs, Running. Its lease (lmsys.lease) names the flow run and stops being
refreshed, so the next command that takes the root's lease (`lmsys run`, a step command, the flow
of a deployment run) finds it dead at once on the same machine (its pid is gone) or, on another
node, after lmsys.lease.MISSED_HEARTBEATS missed heartbeats (30 s); that command sets the flow run
and its task runs still Running or Pending to Crashed here, and says so.
"""
from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
from pathlib import Path
from typing import Iterator

from lmsys import lease

API_WAIT_S = 10                                    # a health probe before any client call: no retries against nothing


def _api_url() -> str | None:
    from flows.runners import prefect_api_url
    return prefect_api_url()


def _api_answers() -> str | None:
    """Why the Prefect API cannot be used now, or None when it answers (a probe, not the client's retries)."""
    url = _api_url()
    if not url:
        return "no Prefect API configured (PREFECT_API_URL)"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=API_WAIT_S):
            return None
    except OSError as e:
        return f"the Prefect API at {url} does not answer ({e})"


def mark_crashed(flow_run_id: str, why: str) -> str:
    """Set flow run `flow_run_id` (and its task runs still Running or Pending) to Crashed with the
    message `why`, unless it has already ended. Returns what was done, in words; never raises (the
    command that found the dead run goes on either way)."""
    problem = _api_answers()
    if problem:
        return f"flow run {flow_run_id} not marked Crashed: {problem}"
    try:
        return _set_crashed(flow_run_id, why)
    except Exception as e:                          # noqa: BLE001  (an unknown id, another server: said, not raised)
        return f"flow run {flow_run_id} not marked Crashed: {type(e).__name__}: {e}"


def crash_task_runs(flow_run_id: str, why: str) -> int:
    """Set the task runs of `flow_run_id` still Running or Pending to Crashed (a stopped run's
    workers were killed in their task: nothing else reports them). Returns how many; never raises."""
    if _api_answers():
        return 0
    try:
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            return _crash_task_runs(client, flow_run_id, why)
    except Exception:                               # noqa: BLE001  (best effort while the run stops)
        return 0


def _crash_task_runs(client, flow_run_id: str, why: str) -> int:
    from uuid import UUID

    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
        task_run_filter=TaskRunFilter(state=TaskRunFilterState(
            type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
    for t in tasks:
        client.set_task_run_state(t.id, Crashed(message=why), force=True)
    return len(tasks)


def _set_crashed(flow_run_id: str, why: str) -> str:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if run.state is not None and run.state.is_final():
            return f"flow run {flow_run_id} had already ended ({run.state.name})"
        n = _crash_task_runs(client, flow_run_id, why)
        client.set_flow_run_state(UUID(flow_run_id), Crashed(message=why), force=True)
    return f"flow run {flow_run_id} ({run.name}) marked Crashed, with {n} task run(s) it left running"


def took_over(dead: dict, say) -> None:
    """After lmsys.lease took over the lease of a dead holder (`dead`: its record): say so, and mark
    its flow run Crashed."""
    line = f"took over the run lease of {lease.describe(dead)}: {dead.get('stale')}"
    if dead.get("flow_run_id"):
        line += "; " + mark_crashed(dead["flow_run_id"], f"its process died ({dead.get('stale')}); found by "
                                    f"pid {os.getpid()} on {socket.gethostname()}")
    say(line)


@contextlib.contextmanager
def hold_root(root: str | Path, flow_run_id: str | None = None, say=print) -> Iterator[lease.Lease]:
    """lmsys.lease.hold for a command or flow that writes `root`; a dead holder it replaced is said
    (once, by the first hold that can reach the Prefect API) and its flow run marked Crashed."""
    with lease.hold(root, flow_run_id=flow_run_id) as held:
        if held.took_over and not held.announced:
            held.announced = True
            took_over(held.took_over, say)
        yield held
