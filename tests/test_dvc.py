"""DVC lineage, for real: dvc.yaml generated from the step registry; `dvc repro` runs the reduced
pipeline and then has nothing to do; a parameter change reruns only its dependants; a Prefect
flow run (`lmsys run`, real server) is recorded in dvc.lock; push to a local remote and pull into
a fresh clone restore the artifacts byte for byte.

The pipeline runs in a git copy of the working tree (tests/lineage_support.py) with a reduced tiny
profile written into its params.yaml; the tests of the module share that copy. They run in any
order: the first `dvc repro` is a module fixture (`reproduced`), and each test that changes the copy
leaves it committed with `dvc status` clean.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np

import pytest
import yaml

from lineage_support import ROOT, PrefectServer, edit_params, make_copy, sh, stages_run, tree_bytes

UP_TO_DATE = "Data and pipelines are up to date."


def test_committed_dvc_yaml_is_generated():
    """The repo's dvc.yaml is exactly what `lmsys dvc-yaml` generates from the registry + params.yaml."""
    from stages.lineage import render_dvc_yaml
    assert (ROOT / "dvc.yaml").exists(), "dvc.yaml missing: run `lmsys dvc-yaml`"
    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml(root=ROOT), \
        "dvc.yaml differs from the step registry / params.yaml: run `lmsys dvc-yaml` and commit it"


def test_dvc_yaml_shape():
    """Fanned-out steps are matrix stages over the config's models/folds; params include the profile's
    overrides; step 9's metrics and plots are declared as such."""
    from lmsys.config import load_config
    from stages.lineage import dvc_stages
    cfg = load_config(params_path=ROOT / "params.yaml")
    st = dvc_stages(root=ROOT)
    assert st["train-teacher"]["matrix"] == {"model": cfg["models"]["teachers"],
                                             "fold": list(range(cfg["folds"]["n_folds"]))}
    assert st["train-teacher"]["cmd"].startswith("lmsys train-teacher ")
    assert "artifacts/tiny/teachers/${item.model}/fold${item.fold}" in st["train-teacher"]["outs"]
    assert "lmsys/train.py" in st["train-teacher"]["deps"]
    assert {"train_teacher", f"profiles.{cfg['profile']}.train_teacher"} <= set(st["train-teacher"]["params"])
    assert st["evaluate"]["metrics"] == [{f"reports/{cfg['profile']}/metrics.json": {"cache": False}}]
    plots = {next(iter(p)) if isinstance(p, dict) else p for p in st["evaluate"]["plots"]}
    assert {f"reports/{cfg['profile']}/{f}" for f in ("fold_losses.csv", "reliability.csv", "reliability.png")} <= plots


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dvc")
    (tmp / "repo").mkdir()
    return make_copy(tmp / "repo", tmp)


@pytest.fixture(scope="module")
def reproduced(repo):
    """The first `dvc repro` of the copy (every stage runs), committed; returns its stdout."""
    path, env = repo
    r = sh(["dvc", "repro"], path, env, timeout=3600)
    sh("git add -A && git commit -qm 'dvc repro'", path, env)
    return r.stdout


@pytest.fixture(scope="module")
def server(repo):
    s = PrefectServer(repo[1])
    yield s
    s.stop()


@pytest.mark.slow
def test_check_flags_a_stale_dvc_yaml(repo):
    path, env = repo
    assert sh(["lmsys", "dvc-yaml", "--check"], path, env).returncode == 0
    stale = path / "stale.yaml"
    stale.write_text((path / "dvc.yaml").read_text().replace("distill:", "distil:", 1))
    r = sh(["lmsys", "dvc-yaml", "--check", "--out", str(stale)], path, env, check=False)
    assert r.returncode == 1 and "+++" in r.stdout
    stale.unlink()


def _student_oof_log_loss(path) -> float:
    """The student's out-of-fold log loss recomputed from its oof.parquet files (TTA: each row's
    probabilities averaged with the swapped order's, A and B exchanged back), with sklearn."""
    from sklearn.metrics import log_loss

    from lmsys.data.schema import LOGIT_COLUMNS
    from lmsys.metrics import softmax
    import pandas as pd
    o = pd.concat([pd.read_parquet(f) for f in sorted(path.glob("artifacts/tiny/students/fold*/oof.parquet"))])
    p, ps = softmax(o[LOGIT_COLUMNS].to_numpy()), softmax(o[[f"swapped_{c}" for c in LOGIT_COLUMNS]].to_numpy())
    return float(log_loss(o["label"].to_numpy(), (p + ps[:, [1, 0, 2]]) / 2, labels=[0, 1, 2]))


@pytest.mark.slow
def test_repro_runs_the_pipeline_then_nothing(repo, reproduced, tmp_path):
    path, env = repo
    ran = stages_run(reproduced)
    listed = sh(["dvc", "stage", "list", "--name-only"], path, env).stdout.split()
    assert "train-teacher@llama-1" in listed and "distill@1" in listed
    assert sorted(ran) == sorted(listed), f"dvc repro ran {ran}, stages {listed}"
    r = sh(["dvc", "repro"], path, env)
    assert stages_run(r.stdout) == [] and UP_TO_DATE in r.stdout.splitlines()
    assert UP_TO_DATE in sh(["dvc", "status"], path, env).stdout.splitlines()
    m = json.loads(sh(["dvc", "metrics", "show", "--json"], path, env).stdout)
    metrics = next(iter(m.values()))["data"]["reports/tiny/metrics.json"]["data"]
    assert metrics == json.loads((path / "reports/tiny/metrics.json").read_text())      # what DVC reports
    assert metrics["student_oof_log_loss"] == pytest.approx(_student_oof_log_loss(path), abs=1e-6)
    assert np.isfinite(metrics["student_oof_log_loss"])
    sh(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], path, env)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "fold_losses" in html and "reliability" in html


@pytest.mark.slow
def test_parameter_change_reruns_only_its_dependants(repo, reproduced):
    """profiles.tiny.predict.tta (a profile override that only step 8 reads; predict.batch_size is
    also read by the ensemble's fold-gain scoring) -> predict, then evaluate (the predictions'
    bytes change), nothing upstream."""
    path, env = repo
    edit_params(path, {"predict": {"tta": False}})
    sh(["lmsys", "dvc-yaml", "--check"], path, env)          # dvc.yaml does not depend on that value
    changed = json.loads(sh(["dvc", "status", "--json"], path, env).stdout)
    assert set(changed) == {"predict"}, changed
    ran = stages_run(sh(["dvc", "repro"], path, env, timeout=1200).stdout)
    assert "predict" in ran and set(ran) <= {"predict", "evaluate"}, ran
    assert UP_TO_DATE in sh(["dvc", "status"], path, env).stdout.splitlines()
    sh("git add -A && git commit -qm 'predict without tta'", path, env)


@pytest.mark.slow
def test_flow_run_is_recorded_in_dvc_lock(repo, reproduced, server):
    """`lmsys run` (Prefect flow, real server, empty task cache: every step runs) leaves `dvc status`
    clean; its lineage artifact names the git revision and the dvc.lock hashes."""
    path, env = repo
    before = yaml.safe_load((path / "dvc.lock").read_text())
    sh(["lmsys", "run"], path, server.env(env), timeout=3600)
    run = json.loads((path / "artifacts" / "tiny" / "flow_run.json").read_text())
    states = {r["task"]: r["state"] for r in run["records"]}
    assert set(states.values()) == {"Completed"}, states                 # every task ran: nothing cached
    assert UP_TO_DATE in sh(["dvc", "status"], path, env).stdout.splitlines()
    assert stages_run(sh(["dvc", "repro"], path, env).stdout) == []
    listed = sh(["dvc", "stage", "list", "--name-only"], path, env).stdout.split()
    assert sorted(run["dvc"]["stages"]) == sorted(listed)
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(before["stages"])
    art = server.artifact("lmsys-lineage", run.get("flow_run_id"))
    assert art is not None, "no lmsys-lineage artifact"
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()
    assert rev in art["data"]
    md5 = next(o["md5"] for o in lock["stages"]["train-teacher@llama-0"]["outs"])
    assert md5 in art["data"]
    sh("git add -A && git commit -qm 'flow run'", path, env)


@pytest.mark.slow
def test_push_then_pull_into_a_fresh_clone_restores_bytes(repo, reproduced, tmp_path):
    path, env = repo
    remote = tmp_path / "remote"
    url = sh(["dvc", "remote", "default"], path, env).stdout.strip()
    assert url == "local"                                     # the committed default remote
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], path, env)
    sh(["dvc", "push"], path, env, timeout=600)
    assert remote.is_dir() and any(remote.rglob("*"))
    assert "Cache and remote 'local' are in sync." in sh(["dvc", "status", "--cloud"], path, env).stdout.splitlines()
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    assert not (clone / "artifacts").exists()
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], clone, env)
    sh(["dvc", "pull"], clone, env, timeout=600)
    assert UP_TO_DATE in sh(["dvc", "status"], clone, env).stdout.splitlines()
    for rel in ("data/demo", "artifacts/tiny/folds", "artifacts/tiny/logits", "artifacts/tiny/teachers",
                "artifacts/tiny/post_pretrain", "artifacts/tiny/students", "artifacts/tiny/ensemble"):
        a, b = tree_bytes(path / rel), tree_bytes(clone / rel)
        assert a and a == b, f"{rel} differs after dvc pull"
    assert list((clone / "artifacts/tiny/teachers/llama/fold0").rglob("adapter_model.safetensors"))
    assert (clone / "artifacts/tiny/logits/llama/fold1.parquet").exists()
