"""Prefect events the pipeline emits: `lmsys.data.added` (from `lmsys data add`), which the
event-triggered deployment (deployments/ops_flows.py:ingest_new_data) listens for."""
from __future__ import annotations

from pathlib import Path

EVENT_DATA_ADDED = "lmsys.data.added"


def emit_data_event(path: Path, kind: str, sha: str, rows: int, root: Path) -> str | None:
    """Emit `lmsys.data.added` to the configured Prefect server; returns the event id (None: no server)."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL
    if not PREFECT_API_URL.value():
        return None
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = str(path)
    ev = emit_event(event=EVENT_DATA_ADDED,
                    resource={"prefect.resource.id": f"lmsys.data.{sha[:16]}", "prefect.resource.name": path.name},
                    payload={"path": str(path), "relpath": rel, "kind": kind, "sha256": sha, "rows": rows})
    EventsWorker.drain_all(timeout=30)
    return str(ev.id) if ev else None
