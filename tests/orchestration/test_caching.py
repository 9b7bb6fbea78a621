"""Caching of the Prefect flow on the local runner, against the real test server.

One root, four runs of the same small pipeline (orch_config.CACHING; session fixture):
  first   nothing cached: every task runs
  again   nothing changed: every task is a cache hit, in at most 10% of the first run's wall time
  lr      distill.lr changed: distill, ensemble, predict, evaluate rerun; the teachers stay cached
  code    the source of a module in ensemble's code hash edited: ensemble reruns, its upstream does not

The code edit touches no repo file: for the session, the ensemble step's module list (what
tasks.steps.code_hash hashes with inspect.getsource) also names a module in a tmp dir, whose source
the test then edits, exactly as an edit of lmsys/steps/student.py would change the key.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time

import pytest
from orch_config import CACHING

PROBE = "lmsys_code_probe"
BEFORE_ENSEMBLE = ["demo-data", "prepare", "folds", "tokenizer", "post-pretrain-modelllama",
                   "filter-score-modelllama", "filter-argmax-fold0", "filter-argmax-fold1", "train-teacher-fold0-modelllama",
                   "train-teacher-fold1-modelllama", "teacher-logits-fold0-modelllama",
                   "teacher-logits-fold1-modelllama", "calibrate-modelllama", "distill-fold0", "distill-fold1"]
ALL = [*BEFORE_ENSEMBLE, "ensemble", "predict", "evaluate"]


@pytest.fixture(scope="session")
def local_runs(pipeline_api, tmp_path_factory):
    from lmsys.io import tree_sha256
    from lmsys.paths import Layout
    from lmsys.steps import STEPS
    root = tmp_path_factory.mktemp("local-root")
    layout = Layout("tiny", root)
    probe_dir = tmp_path_factory.mktemp("probe")
    probe = probe_dir / f"{PROBE}.py"
    probe.write_text('"""Stands in for a module of the ensemble step."""\n\ndef weight():\n    return 1.0\n')
    runs: dict[str, dict] = {}

    def go(name: str, **over):
        t0 = time.perf_counter()
        out = pipeline_api.run_pipeline(profile="tiny", runner="local", overrides={**CACHING, **over}, root=str(root))
        wall = time.perf_counter() - t0
        rec = json.loads((layout.art / "flow_run.json").read_text())["records"]
        runs[name] = {"out": out, "wall": wall, "states": {r["task"]: r["state"] for r in rec},
                      "ensemble_hash": tree_sha256(layout.ensemble)}
        print(f"\n[local run {name}] {wall:.2f} s wall ({out['seconds']:.2f} s in the flow's levels), "
              f"{out['cached']}/{out['tasks']} cached", file=sys.stderr)

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(probe_dir))
        ens = STEPS["ensemble"]
        mp.setitem(STEPS, "ensemble", dataclasses.replace(ens, modules=(*ens.modules, PROBE)))
        go("first")
        go("again")
        go("lr", **{"distill.lr": 1.0e-3})
        probe.write_text(probe.read_text().replace("return 1.0", "return 0.5  # edited"))
        sys.modules.pop(PROBE, None)
        importlib.invalidate_caches()
        go("code", **{"distill.lr": 1.0e-3})
    return runs


def _rerun(run: dict) -> set[str]:
    return {t for t, s in run["states"].items() if s != "Cached"}


def test_first_run_runs_every_task(local_runs):
    first = local_runs["first"]
    assert sorted(first["states"]) == sorted(ALL)
    assert first["out"]["cached"] == 0 and first["out"]["tasks"] == len(ALL)
    assert set(first["states"].values()) == {"Completed"}
    assert first["out"]["runner"] == "local"


def test_rerun_with_nothing_changed_is_all_cached_and_fast(local_runs):
    first, again = local_runs["first"], local_runs["again"]
    assert again["out"]["cached"] == again["out"]["tasks"] == len(ALL)
    assert set(again["states"].values()) == {"Cached"}, again["states"]     # per-task records, flow_run.json
    assert again["wall"] <= 0.10 * first["wall"], (again["wall"], first["wall"])
    # the flow body (plan, levels, cache checks; without Prefect's flow start/teardown) does no work either
    assert again["out"]["seconds"] <= 0.05 * first["out"]["seconds"], (again["out"]["seconds"], first["out"]["seconds"])


def test_changing_a_parameter_reruns_only_its_dependents(local_runs):
    lr = local_runs["lr"]
    assert _rerun(lr) == {"distill-fold0", "distill-fold1", "ensemble", "predict", "evaluate"}, lr["states"]
    assert lr["out"]["cached"] == len(ALL) - 5
    for t in ("train-teacher-fold0-modelllama", "train-teacher-fold1-modelllama", "teacher-logits-fold0-modelllama"):
        assert lr["states"][t] == "Cached"


def test_editing_a_steps_code_reruns_that_step(local_runs):
    code, lr = local_runs["code"], local_runs["lr"]
    assert code["states"]["ensemble"] != "Cached"
    assert all(code["states"][t] == "Cached" for t in BEFORE_ENSEMBLE), code["states"]
    # downstream keys hash the ensemble's content: they rerun only when the rerun changed its bytes
    same = code["ensemble_hash"] == lr["ensemble_hash"]
    assert (code["states"]["predict"] == "Cached") == same, (same, code["states"])
