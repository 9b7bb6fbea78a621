"""Create the work pool and the three deployments on the Prefect server at PREFECT_API_URL.

    python deployments/deploy.py [--pool lmsys-local] [--root .] [--cron "0 3 * * *"] [--profile tiny]

- lmsys-pipeline/ui                          flows/pipeline.py:pipeline, typed parameters, run from the UI
- lmsys-rerun-if-data-changed/scheduled      cron; runs the pipeline only when the data changed
- lmsys-ingest-new-data/on-new-data          triggered by the `lmsys.data.added` event of `lmsys data add`

All run on a process work pool (`prefect worker start --pool lmsys-local`), in the checkout `--root`
(the flow code is loaded from there, and lmsys is imported from there through PYTHONPATH).
See deployments/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow
from prefect.events import DeploymentEventTrigger

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flows.events import EVENT_DATA_ADDED

POOL = "lmsys-local"
CRON = "0 3 * * *"


def ensure_pool(name: str) -> None:
    """A process work pool `name` (created when missing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker
    with get_client(sync_client=True) as c:
        try:
            c.read_work_pool(name)
        except ObjectNotFound:
            c.create_work_pool(WorkPoolCreate(name=name, type="process",
                                              base_job_template=ProcessWorker.get_default_base_job_template()))


def job_variables(root: Path) -> dict:
    # working_dir: the flows read and write the checkout; PYTHONPATH: its lmsys/flows/tasks, not an
    # installed copy's; one task thread at a time (the steps seed torch's global RNG).
    return {"working_dir": str(root),
            "env": {"PYTHONPATH": str(root), "PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS": "1"}}


def deploy_all(root: Path | str = ROOT, pool: str = POOL, cron: str = CRON, profile: str | None = None) -> dict:
    """Create/update the pool and the deployments; returns {deployment name: id}."""
    from lmsys.config import load_config
    root = Path(root).resolve()
    profile = profile or load_config(params_path=root / "params.yaml")["profile"]
    ensure_pool(pool)
    jv = job_variables(root)
    common = dict(work_pool_name=pool, job_variables=jv, build=False, push=False, print_next_steps=False,
                  ignore_warnings=True, tags=["lmsys"])
    ids = {}
    f = flow.from_source(str(root), "flows/pipeline.py:pipeline")
    ids["lmsys-pipeline/ui"] = f.deploy(
        name="ui", parameters={"profile": profile},
        description="The whole recipe (`lmsys steps`). Parameters: profile, data files (default: the demo), dotted "
                    "params overrides (folds.use, models.teachers, calibrate.enabled, orchestration.runner, ...), root.",
        **common)
    f = flow.from_source(str(root), "deployments/ops_flows.py:rerun_if_data_changed")
    ids["lmsys-rerun-if-data-changed/scheduled"] = f.deploy(
        name="scheduled", cron=cron, parameters={"profile": profile},
        description="Cron: rerun the pipeline when the data files changed since the last successful run.", **common)
    f = flow.from_source(str(root), "deployments/ops_flows.py:ingest_new_data")
    trigger = DeploymentEventTrigger(
        name="lmsys-new-data", enabled=True, expect={EVENT_DATA_ADDED}, match={"prefect.resource.id": "lmsys.data.*"},
        parameters={"path": "{{ event.payload.path }}", "kind": "{{ event.payload.kind }}", "profile": profile})
    ids["lmsys-ingest-new-data/on-new-data"] = f.deploy(
        name="on-new-data", triggers=[trigger], parameters={"profile": profile},
        description="Event lmsys.data.added (`lmsys data add FILE`): the pipeline with the new file.", **common)
    return {k: str(v) for k, v in ids.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="the checkout the deployments run in (default: this one)")
    ap.add_argument("--pool", default=POOL)
    ap.add_argument("--cron", default=CRON, help="schedule of the data-changed rerun (default: 03:00 daily)")
    ap.add_argument("--profile", help="default: params.yaml's profile")
    a = ap.parse_args(argv)
    print(json.dumps(deploy_all(a.root, a.pool, a.cron, a.profile), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
