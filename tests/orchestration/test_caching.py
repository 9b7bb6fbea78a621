"""Caching of the Prefect flow on the local runner, against the real test server.

One root, five runs of the same small pipeline (orch_config.SMALL; session fixture):
  first   nothing cached: every task runs
  again   nothing changed: every task is a cache hit and no step output is rewritten
  lr      distill.lr changed: distill, ensemble, predict, evaluate rerun; the teachers stay cached
  code    lmsys/tta.py edited: predict and evaluate rerun (same bytes), nothing upstream
  back    distill.lr back to the first run's: distill's tasks are cache hits of the first run whose
          outputs the lr runs replaced since: rerun ("Completed (refreshed)"), same bytes as first

The code edit touches no repo file: for the session, the code hashes (the fixture patches tasks.steps.code_hash) are read
from a copy of lmsys/ in a tmp dir, whose tta.py the test then edits, exactly as an edit of the
repo's lmsys/tta.py would change the keys of the steps whose import closure holds it.
"""
from __future__ import annotations

import json
import re
import sys
import shutil
import time

import pytest
from orch_config import SMALL

def _tasks(overrides: dict) -> list[str]:
    """Task labels of the flow for these overrides, in plan order (what the flow runs)."""
    from lmsys.config import load_config
    from lmsys.steps.recipe import tasks_of, task_label
    return [task_label(n, k) for n, k in tasks_of(load_config("tiny", overrides))]


ALL = _tasks(SMALL)
AFTER = ["ensemble", "predict", "evaluate"]
BEFORE_ENSEMBLE = [t for t in ALL if t not in AFTER]
assert ALL[-3:] == AFTER, ALL


@pytest.fixture(scope="session")
def local_runs(pipeline_api, tmp_path_factory):
    import tasks.steps
    from lmsys.io import file_sha256, tree_sha256
    from lmsys.paths import Layout
    from lmsys.steps import code
    from lmsys.steps.code import SOURCE_ROOT
    root = tmp_path_factory.mktemp("local-root")
    layout = Layout("tiny", root)
    code_root = tmp_path_factory.mktemp("code")
    shutil.copytree(SOURCE_ROOT / "lmsys", code_root / "lmsys", ignore=shutil.ignore_patterns("__pycache__"))
    runs: dict[str, dict] = {}

    def go(name: str, **over):
        t0 = time.perf_counter()
        out = pipeline_api.run_pipeline(profile="tiny", runner="local", overrides={**SMALL, **over}, root=str(root))
        wall = time.perf_counter() - t0
        rec = json.loads((layout.art / "flow_run.json").read_text())["records"]
        runs[name] = {"out": out, "wall": wall, "states": {r["task"]: r["state"] for r in rec},
                      "ensemble_hash": tree_sha256(layout.ensemble), "files": _written(root),
                      "submission_hash": file_sha256(layout.submission),
                      "report": (layout.reports / "report.md").read_text(),
                      "plots": {p.name: p.read_bytes() for p in layout.reports.glob("*.png")},
                      "metrics": json.loads((layout.reports / "metrics.json").read_text())}
        print(f"\n[local run {name}] {wall:.2f} s wall ({out['seconds']:.2f} s in the flow's tasks), "
              f"{out['cached']}/{out['tasks']} cached", file=sys.stderr)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.steps, "code_hash", lambda step: code.code_hash(step.module, code_root))
        go("first")
        runs["first"]["sha"] = _hashes(root)
        go("again")
        go("lr", **{"distill.lr": 1.0e-3})
        tta = code_root / "lmsys" / "tta.py"
        tta.write_text(tta.read_text() + "\n# edited: the code of every step whose import closure holds lmsys.tta\n")
        go("code", **{"distill.lr": 1.0e-3})
        go("back")
    return runs


# written by every flow run, cached or not: the run's own records (lineage, flow summary)
RUN_RECORDS = ("artifacts/tiny/flow_run.json", "artifacts/tiny/data_state.json")


def _written(root) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under the run's root: what a run wrote, observed."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file() and ".running" not in p.parts}


def _artifacts(api_url: str, flow_run_id: str) -> dict[str, object]:
    """The artifacts of a flow run, read back from the server's REST API: key -> data (tables and
    progress decoded from their JSON text)."""
    import urllib.request
    body = json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode()
    req = urllib.request.Request(f"{api_url}/artifacts/filter", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        rows = json.loads(r.read())
    out = {}
    for a in rows:
        data = a["data"]
        if a["type"] in ("table", "progress") and isinstance(data, str):
            data = json.loads(data)
        out[a["key"]] = data
    return out


def _timing_key(k: str) -> bool:
    """Keys of the JSON records that say when, how fast or with which commit, not what was computed
    (train_seconds, samples_per_s, git_rev, ...)."""
    return k in ("seconds", "started", "finished", "git_rev") or k.endswith(("_seconds", "_per_s"))


GIT_REV = re.compile(rb"\b[0-9a-f]{40}(\+dirty)?\b")      # the report names the commit it ran at


def _normalised(obj, root: str):
    """A JSON record with the run's root spelled <root> and its timing keys left out."""
    if isinstance(obj, dict):
        return {k.replace(root, "<root>"): _normalised(v, root) for k, v in obj.items() if not _timing_key(k)}
    if isinstance(obj, list):
        return [_normalised(v, root) for v in obj]
    return obj.replace(root, "<root>") if isinstance(obj, str) else obj


def _hashes(root) -> dict[str, str]:
    """sha256 of every file under the root: bytes for data, models and tables; for JSON records,
    their content with the root's path and timings normalised away (_normalised)."""
    import hashlib
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not {".running", ".stamps"} & set(p.parts):     # cache bookkeeping, not outputs
            data = p.read_bytes()
            if p.suffix == ".json":
                data = json.dumps(_normalised(json.loads(data), str(root)), sort_keys=True).encode()
            elif p.suffix == ".md":
                data = GIT_REV.sub(b"<rev>", data.replace(str(root).encode(), b"<root>"))
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _rerun(run: dict) -> set[str]:
    return {t for t, s in run["states"].items() if s != "Cached"}


def test_first_run_runs_every_task(local_runs):
    first = local_runs["first"]
    assert sorted(first["states"]) == sorted(ALL)
    assert first["out"]["cached"] == 0 and first["out"]["tasks"] == len(ALL)
    assert set(first["states"].values()) == {"Completed"}
    assert first["out"]["runner"] == "local"


def test_rerun_with_nothing_changed_is_all_cached_and_does_no_work(local_runs):
    """Counted, not timed: no task executes and no step output is rewritten (every file of the root
    keeps its mtime and size) -- only the run's own records change."""
    first, again = local_runs["first"], local_runs["again"]
    assert again["out"]["cached"] == again["out"]["tasks"] == len(ALL)
    assert set(again["states"].values()) == {"Cached"}, again["states"]     # per-task records, flow_run.json
    assert set(again["files"]) == set(first["files"])                        # no file added or removed
    rewritten = {f for f, st in again["files"].items() if st != first["files"][f]}
    assert rewritten <= set(RUN_RECORDS), sorted(rewritten)
    print(f"\n[local runs] wall {first['wall']:.1f} s first, {again['wall']:.1f} s all cached", file=sys.stderr)


def test_changing_a_parameter_reruns_only_its_dependents(local_runs):
    lr = local_runs["lr"]
    assert _rerun(lr) == {"distill-fold0", "distill-fold1", "ensemble", "predict", "evaluate"}, lr["states"]
    assert lr["out"]["cached"] == len(ALL) - 5
    for t in ("train-teacher-fold0-modelllama", "train-teacher-fold1-modelllama", "teacher-logits-fold0-modelllama"):
        assert lr["states"][t] == "Cached"


def test_editing_tta_reruns_predict_and_evaluate_and_nothing_upstream(local_runs):
    code, lr = local_runs["code"], local_runs["lr"]
    assert _rerun(code) == {"predict", "evaluate"}, code["states"]
    # the edit (a comment) changes their code hash, not what they compute: the same submission
    assert code["submission_hash"] == lr["submission_hash"]
    assert code["ensemble_hash"] == lr["ensemble_hash"]


def test_cache_hit_whose_outputs_were_replaced_is_rerun(local_runs):
    first, back = local_runs["first"], local_runs["back"]
    refreshed = {t for t, st in back["states"].items() if st == "Completed (refreshed)"}
    assert refreshed >= {"distill-fold0", "distill-fold1"}, back["states"]
    # ensemble: the refreshed students' dirs carry new timings (a new key) or not (a refreshed hit);
    # predict and evaluate: their code changed (tta.py), so new keys
    for t in ("ensemble", "predict", "evaluate"):
        assert back["states"][t] in ("Completed", "Completed (refreshed)"), back["states"]
    assert all(back["states"][t] == "Cached" for t in BEFORE_ENSEMBLE if not t.startswith("distill")), back["states"]
    assert back["ensemble_hash"] == first["ensemble_hash"]      # the refreshed students are the first run's
    for f in ("artifacts/tiny/predictions/submission.csv", "reports/tiny/metrics.json"):
        assert back["files"][f][1] == first["files"][f][1], f


def _plots_by_name(markdown: str, plots: dict[str, bytes]) -> str:
    """The report artifact's embedded plots (data:image/png;base64 URIs) back to the file names
    whose bytes they hold; a URI matching no plot file is left as is (and fails the comparison)."""
    import base64
    names = {b: n for n, b in plots.items()}
    return re.sub(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)",
                  lambda m: f"({names.get(base64.b64decode(m.group(1)), m.group(0)[1:-1])})", markdown)


def test_artifacts_read_back_from_the_server(local_runs, prefect_server):
    """The task table, metrics table, report and progress of a run, as the server holds them."""
    for name in ("first", "again"):
        run = local_runs[name]
        art = _artifacts(prefect_server, run["out"]["flow_run_id"])
        assert {"lmsys-tasks", "lmsys-metrics", "lmsys-report", "lmsys-progress", "lmsys-lineage"} <= set(art), sorted(art)
        assert {r["task"]: r["state"] for r in art["lmsys-tasks"]} == run["states"]
        assert {r["metric"]: r["value"] for r in art["lmsys-metrics"]} == pytest.approx(run["metrics"])
        assert "](data:image/png;base64," in art["lmsys-report"]                # plots embedded for the UI
        assert _plots_by_name(art["lmsys-report"], run["plots"]) == run["report"]
        assert art["lmsys-progress"] == 100.0


# The runs' own records (when, where, which flow run) and the content manifests beside each output
# (each file's mtime, lmsys.io.write_manifest): they differ between two runs by design.
TIMED = RUN_RECORDS


def _timed(rel: str) -> bool:
    return rel in TIMED or rel.endswith(".manifest.json") and rel.rsplit("/", 1)[-1].startswith(".")


@pytest.fixture(scope="session")
def second_local_run(local_runs, pipeline_api, tmp_path_factory):
    """The first run's pipeline again, in a fresh root. The cache keys name inputs relative to the root,
    so each task's key is a hit of the first root's run, but its outputs are missing here: every task
    runs (flows.pipeline refreshes a task whose outputs do not exist)."""
    root = tmp_path_factory.mktemp("local-root-2")
    out = pipeline_api.run_pipeline(profile="tiny", runner="local", overrides=SMALL, root=str(root))
    return out, _hashes(root)


def test_two_local_runs_write_byte_identical_outputs(local_runs, second_local_run):
    out, second = second_local_run
    assert out["cached"] == 0, out
    first = local_runs["first"]["sha"]
    assert set(second) == set(first), sorted(set(second) ^ set(first))
    differ = sorted(f for f in first if first[f] != second[f] and not _timed(f))
    assert differ == [], differ
