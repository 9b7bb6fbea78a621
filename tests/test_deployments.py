"""Deployments, for real: a Prefect server (isolated PREFECT_HOME), the process work pool and its
worker, the three deployments of deployments/deploy.py created in a git copy of the working tree
(reduced tiny profile); a pipeline run triggered through the API completes; the scheduled rerun
with unchanged data runs no step; `lmsys data add` validates, versions with DVC and emits the event
whose trigger runs the pipeline on the new file.

The tests of the module share the copy, server and worker; they run in any order: the first pipeline
run is a module fixture (`first_run`, what it observes is captured at once), and the tests that need
"the data as of the last successful run" establish it themselves.
"""
from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import yaml

from lineage_support import PrefectServer, make_copy, sh, start_background, stop_background

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 3000
DEPLOYMENTS = ("lmsys-pipeline/ui", "lmsys-rerun-if-data-changed/scheduled", "lmsys-ingest-new-data/on-new-data")


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """(repo, env with PREFECT_API_URL, server, worker log) with the deployments created and a worker running."""
    tmp = tmp_path_factory.mktemp("deploy")
    (tmp / "repo").mkdir()
    path, env = make_copy(tmp / "repo", tmp)
    server = PrefectServer(env)
    env = server.env(env)
    worker = None
    try:
        r = sh(["python", "deployments/deploy.py", "--root", str(path)], path, env, timeout=300)
        ids = json.loads(r.stdout[r.stdout.index("{"):])
        wenv = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        worker = start_background(["prefect", "worker", "start", "--pool", "lmsys-local", "--type", "process",
                                   "--limit", "1"], path, wenv, tmp / "worker.log")
        yield {"path": path, "env": env, "server": server, "ids": ids, "worker_log": tmp / "worker.log", "tmp": tmp}
    finally:
        if worker is not None:
            stop_background(worker)
        server.stop()


def _run_deployment(ops, name: str, parameters: dict) -> dict:
    s = ops["server"]
    dep = s.api("GET", f"/deployments/name/{name}")
    fr = s.api("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
    return _finished(ops, fr["id"])


def _finished(ops, run_id: str) -> dict:
    fr = ops["server"].wait_run(run_id, RUN_TIMEOUT)
    assert fr["state"]["type"] == "COMPLETED", (fr["state"], ops["worker_log"].read_text()[-5000:])
    return fr


def _task_runs(ops, flow_run_id: str) -> list[dict]:
    return ops["server"].api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


def _subflows(ops, flow_run_id: str) -> list[dict]:
    """Flow runs started inside `flow_run_id` (the pipeline as a subflow)."""
    tasks = [t["id"] for t in _task_runs(ops, flow_run_id)]
    return ops["server"].flow_runs(flow_runs={"parent_task_run_id": {"any_": tasks}}) if tasks else []


def test_deployments_are_created(ops):
    s = ops["server"]
    for name in DEPLOYMENTS:
        d = s.api("GET", f"/deployments/name/{name}")
        assert d["work_pool_name"] == "lmsys-local" and d["id"] == ops["ids"][name]
        assert d["job_variables"]["working_dir"] == str(ops["path"])
    ui = s.api("GET", "/deployments/name/lmsys-pipeline/ui")
    props = ui["parameter_openapi_schema"]["properties"]
    profiles = yaml.safe_load((ops["path"] / "params.yaml").read_text())["profiles"]
    assert sorted(props["profile"]["enum"]) == sorted(profiles)             # every profile of params.yaml
    # the flow's one signature: the folds, teachers, optional steps and runner are dotted overrides
    assert set(props) == {"profile", "train", "test", "external", "ut", "overrides", "root", "check"}, sorted(props)
    assert {"type": "array", "items": {"type": "string"}} in props["external"]["anyOf"]
    cron = s.api("GET", "/deployments/name/lmsys-rerun-if-data-changed/scheduled")["schedules"]
    assert cron and cron[0]["schedule"]["cron"] == "0 3 * * *" and cron[0]["active"]
    ing = s.api("GET", "/deployments/name/lmsys-ingest-new-data/on-new-data")
    autos = s.api("GET", f"/automations/related-to/prefect.deployment.{ing['id']}")
    assert any(a["trigger"]["expect"] == ["lmsys.data.added"] and a["actions"][0]["type"] == "run-deployment"
               and a["actions"][0]["parameters"]["path"] == "{{ event.payload.path }}" for a in autos), autos
    pool = s.api("GET", "/work_pools/lmsys-local")
    assert pool["type"] == "process"


@pytest.fixture(scope="module")
def first_run(ops):
    """The UI deployment's pipeline run, and what it left behind, observed right after it."""
    fr = _run_deployment(ops, "lmsys-pipeline/ui", {"profile": "tiny"})
    return {"run": fr, "tasks": {t["name"].rsplit("-", 1)[0] for t in _task_runs(ops, fr["id"])},
            "dvc_status": sh(["dvc", "status"], ops["path"], ops["env"]).stdout,
            "data_state": json.loads((ops["path"] / "artifacts/tiny/data_state.json").read_text()),
            "flow_run": json.loads((ops["path"] / "artifacts/tiny/flow_run.json").read_text())}


def test_pipeline_run_through_the_api_completes(ops, first_run):
    fr = first_run["run"]
    assert {"prepare", "train-teacher-fold1-modelllama", "distill-fold0", "predict", "evaluate"} <= first_run["tasks"]
    assert (ops["path"] / "artifacts/tiny/predictions/submission.csv").exists()
    assert ops["server"].artifact("lmsys-metrics", fr["id"]) is not None
    assert ops["server"].artifact("lmsys-lineage", fr["id"]) is not None
    assert set(first_run["data_state"]["files"]) >= {"data/demo/train.csv", "data/demo/test.csv"}, first_run["data_state"]
    assert "Data and pipelines are up to date." in first_run["dvc_status"].splitlines(), first_run["dvc_status"]


def _rerun_artifact(ops, fr) -> str:
    art = ops["server"].artifact("lmsys-rerun", fr["id"])
    assert art, f"no lmsys-rerun artifact for {fr['id']}"
    return art["data"]


def _settle(ops) -> None:
    """Make 'the data as of the last successful run of the default config' hold, whatever ran before
    (a data add records its own file set): one scheduled run, which reruns only if it must."""
    _run_deployment(ops, "lmsys-rerun-if-data-changed/scheduled", {})


def test_scheduled_rerun_with_unchanged_data_does_nothing(ops, first_run):
    _settle(ops)
    fr = _run_deployment(ops, "lmsys-rerun-if-data-changed/scheduled", {})
    assert _task_runs(ops, fr["id"]) == [] and _subflows(ops, fr["id"]) == []
    assert _rerun_artifact(ops, fr).startswith("Nothing to do: data unchanged since the last successful run")
    assert fr["state"]["type"] == "COMPLETED"


def test_scheduled_rerun_when_data_changed_runs_the_pipeline(ops, first_run):
    """A data file of the default config changed on disk (its line endings: other bytes, the same
    rows): the scheduled run says which file changed and runs the pipeline as a subflow, in which
    prepare (whose input changed) reruns and the steps after it, whose inputs prepare rewrote with the
    same bytes, are cache hits (so the test costs one step, not a whole pipeline); the next scheduled
    run has nothing to do."""
    _settle(ops)
    f = ops["path"] / "data/demo/train.csv"
    raw = f.read_bytes()
    f.write_bytes(raw.replace(b"\r\n", b"\n") if b"\r\n" in raw else raw.replace(b"\n", b"\r\n"))
    fr = _run_deployment(ops, "lmsys-rerun-if-data-changed/scheduled", {})
    assert _rerun_artifact(ops, fr) == "Reran the pipeline: data changed since the last successful run: data/demo/train.csv.\n"
    sub = _subflows(ops, fr["id"])
    assert len(sub) == 1 and sub[0]["state"]["type"] == "COMPLETED", sub
    names = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in _task_runs(ops, sub[0]["id"])}
    assert names["prepare"] == "Completed", names                      # its input changed: it reran
    assert names["folds"] == names["distill-fold0"] == names["evaluate"] == "Cached", names
    fr = _run_deployment(ops, "lmsys-rerun-if-data-changed/scheduled", {})
    assert _rerun_artifact(ops, fr).startswith("Nothing to do: data unchanged")


def test_data_add_refuses_quarantined_rows(ops, tmp_path):
    path, env = ops["path"], ops["env"]
    sh(["lmsys", "demo-data", "--out", str(tmp_path / "d"), "--rows", "30", "--seed", "11"], path, env)
    bad = tmp_path / "bad.csv"
    df = pd.read_csv(tmp_path / "d" / "train.csv")
    df.loc[0, "prompt"] = "not a json list"
    df.to_csv(bad, index=False)
    r = sh(["lmsys", "data", "add", str(bad), "--no-event"], path, env, check=False)
    assert r.returncode == 1 and "quarantined" in r.stderr
    assert not (path / "data/added/bad.csv").exists()
    r = sh(["lmsys", "data", "add", str(tmp_path / "missing.csv"), "--no-event"], path, env, check=False)
    assert r.returncode == 2


def test_data_add_triggers_a_run_on_the_new_file(ops, first_run, tmp_path):
    path, env, s = ops["path"], ops["env"], ops["server"]
    sh(["lmsys", "demo-data", "--out", str(tmp_path / "d"), "--rows", "60", "--seed", "7"], path, env)
    new = tmp_path / "battles_2026.csv"
    (tmp_path / "d" / "train.csv").rename(new)
    dep = s.api("GET", "/deployments/name/lmsys-ingest-new-data/on-new-data")
    r = sh(["lmsys", "data", "add", str(new), "--as", "external"], path, env)
    added = path / "data/added/battles_2026.csv"
    assert added.read_bytes() == new.read_bytes()
    assert (path / "data/added/battles_2026.csv.dvc").exists()                # versioned by DVC
    assert sh(["git", "check-ignore", "-q", "data/added/battles_2026.csv.dvc"], path, env, check=False).returncode == 1
    assert "not emitted" not in r.stdout
    deadline = time.monotonic() + 180                                           # event -> trigger -> flow run
    runs = []
    while not runs and time.monotonic() < deadline:
        runs = s.flow_runs(deployments={"id": {"any_": [dep["id"]]}})
        time.sleep(2)
    assert runs, "the lmsys.data.added event started no run of the ingest deployment"
    fr = _finished(ops, runs[0]["id"])
    assert fr["parameters"]["path"] == str(added) and fr["parameters"]["kind"] == "external"
    sub = _subflows(ops, fr["id"])
    assert sub and str(added) in sub[0]["parameters"]["external"]
    report = json.loads((path / "artifacts/tiny/prepared/report.json").read_text())
    assert str(added) in report["files"] and report["files"][str(added)]["rows_clean"] == 60
    assert (path / "artifacts/tiny/predictions/submission.csv").exists()
    metrics = json.loads((path / "reports/tiny/metrics.json").read_text())       # the demo test set keeps its labels
    assert any(k.startswith("test_log_loss") for k in metrics), sorted(metrics)
