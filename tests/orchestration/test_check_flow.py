"""`lmsys check` against real faults, with the test Prefect server and the single-node SLURM of
start_slurm.sh: each fault makes the command fail (exit 2) on its own line, and makes the flow stop in
its first task (the check), before any step ran, with the check table as the `lmsys-check` artifact.

  missing model directory   a pretrained spec whose path does not exist
  head with 2 labels        a local Llama classifier checkpoint saved with a 2-row score head
  LoRA target absent        a local GPT-2 classifier (Conv1D projections: no q/k/v/o_proj, no BERT names)
  unusable column           a test.csv without its response_b column
  unknown SLURM partition   orchestration.slurm.queue names a partition sinfo does not list
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from check_support import run_check
from orch_config import SLURM, SMALL


def _run_check(capsys, *args) -> tuple[int, str, dict[str, str]]:
    return run_check(capsys, "--profile", "tiny", *args)


def _set_args(over: dict) -> list[str]:
    import json
    return [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="session")
def fault_models(tmp_path_factory) -> dict[str, Path]:
    """Real local checkpoints (config, tokenizer, safetensors) that resolve but must not pass."""
    from transformers import AutoModelForSequenceClassification, GPT2Config, LlamaConfig

    from lmsys.models import train_tokenizer
    base = tmp_path_factory.mktemp("fault-models")
    texts = ["User question: which answer is better?", "Answer A is long. Answer B is short."] * 20
    configs = {"two_labels": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=4, num_labels=2),
               "gpt2": GPT2Config(n_embd=32, n_layer=1, n_head=4, num_labels=3)}
    out = {}
    for name, config in configs.items():
        tok = train_tokenizer(texts, base / name, vocab_size=300)
        config.vocab_size, config.pad_token_id = len(tok), tok.pad_token_id
        AutoModelForSequenceClassification.from_config(config).save_pretrained(base / name)
        out[name] = base / name
    return out


@pytest.fixture(scope="session")
def bad_column_data(demo_dir, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bad-column")
    test = pd.read_csv(demo_dir / "test.csv", dtype=str, keep_default_na=False)
    test.rename(columns={"response_b": "response_2"}).to_csv(d / "test.csv", index=False)
    return {"data.train": str(demo_dir / "train.csv"), "data.test": str(d / "test.csv"),
            "data.external": [str(demo_dir / "external_33k.jsonl")], "data.ut": str(demo_dir / "ut.parquet")}


def _fault(name: str, fault_models, bad_column_data, tmp_path) -> tuple[dict, str, str]:
    """(overrides, the line that must fail, a phrase of its detail)."""
    spec = lambda p: {"models.specs.llama": {"kind": "pretrained", "path": str(p)}}  # noqa: E731
    return {"missing-model": (spec(tmp_path / "no-such-model"), "model llama: resolves offline", "no such directory"),
            "two-label-head": (spec(fault_models["two_labels"]), "model llama: head", "has 2 labels"),
            "lora-target-absent": (spec(fault_models["gpt2"]), "model llama: LoRA targets",
                                   "is a linear layer of GPT2ForSequenceClassification"),
            "unusable-column": (bad_column_data, "data test: test.csv", "missing columns ['response_b']")}[name]


def _check_artifact(flow_run_id=None) -> tuple[list[dict], list[str]]:
    """The newest `lmsys-check` table artifact and the names of its flow run's task runs."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import ArtifactSort
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmsys-check"])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)
        assert arts, "no lmsys-check artifact on the server"
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[arts[0].flow_run_id])))
    data = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
    return data, [r.name for r in runs]


def _assert_stopped_before_any_step(root: Path, failing: str, error: BaseException) -> None:
    from flows.check import PreflightFailed
    assert isinstance(error, PreflightFailed), repr(error)
    assert failing in str(error)
    art = root / "artifacts" / "tiny"
    assert not (art / "post_pretrain").exists() and not (art / "prepared").exists() and not (root / "data").exists()
    table, tasks = _check_artifact()
    assert {r["check"]: r["status"] for r in table}[failing] == "FAIL", table
    assert tasks and all(t.startswith("check") for t in tasks), tasks       # the check task only: no step ran


@pytest.mark.parametrize("fault", ["missing-model", "two-label-head", "lora-target-absent", "unusable-column"])
def test_fault_fails_check_and_stops_the_flow(fault, pipeline_api, fault_models, bad_column_data, capsys, tmp_path):
    over, failing, phrase = _fault(fault, fault_models, bad_column_data, tmp_path)
    code, out, rows = _run_check(capsys, "--root", str(tmp_path / "cli"), *_set_args({**SMALL, **over}))
    assert code == 2, out
    assert [k for k, v in rows.items() if v == "FAIL"] == [failing], out                 # its own line, and only it
    line = out[out.index(failing):].split("\n", 2)
    assert phrase in line[0] and line[1].strip().startswith("fix: "), line
    root = tmp_path / "flow"
    with pytest.raises(Exception) as e:
        pipeline_api.run_pipeline(profile="tiny", root=str(root), overrides={**SMALL, **over})
    _assert_stopped_before_any_step(root, failing, e.value)


def test_unknown_partition_fails_check_and_stops_the_flow(pipeline_api, slurm, capsys, tmp_path):
    over = {**SLURM, "orchestration.slurm.queue": "no-such-partition"}
    code, out, rows = _run_check(capsys, "--runner", "slurm", "--root", str(tmp_path / "cli"), *_set_args(over))
    assert code == 2, out
    assert [k for k, v in rows.items() if v == "FAIL"] == ["slurm: partition"], out
    assert "'no-such-partition' does not exist (sinfo lists: gpu)" in out
    assert "fix: set orchestration.slurm.queue to one of them (--set orchestration.slurm.queue=gpu)" in out
    root = tmp_path / "flow"
    with pytest.raises(Exception) as e:            # as a deployment starts it: the check runs before any SLURM job
        pipeline_api.pipeline(profile="tiny", overrides=over, root=str(root))   # SLURM sets the runner
    _assert_stopped_before_any_step(root, "slurm: partition", e.value)
    assert not (root / "artifacts" / "tiny" / "slurm-logs").exists()                   # no worker job was started


def test_too_many_gpus_fail_the_gres_line(pipeline_api, slurm, capsys, tmp_path):
    code, out, rows = _run_check(capsys, "--runner", "slurm", "--root", str(tmp_path),
                                 *_set_args({**SLURM, "orchestration.slurm.gpus_per_job": 3}))
    assert code == 2 and [k for k, v in rows.items() if v == "FAIL"] == ["slurm: GRES"], out
    assert "gpus_per_job=3 but the nodes of 'gpu' offer at most gpu:2" in out


def test_tiny_on_slurm_runs_the_job_part_on_a_gpu_worker(pipeline_api, slurm, prefect_server, capsys, tmp_path):
    code, out, rows = _run_check(capsys, "--runner", "slurm", "--root", str(tmp_path), *_set_args(SLURM))
    assert code in (0, 1) and "FAIL" not in rows.values(), out
    for line in ("slurm: partition", "slurm: GRES", "slurm: job accepted (sbatch --test-only)", "slurm: job prologue",
                 "slurm: Prefect API from a compute node"):
        assert rows[line] == "ok", (line, out)
    assert f"{prefect_server} answers from" in out
    assert rows["slurm: GPU in the job"] in ("ok", "warn")          # the CI node's GRES is fake: torch sees no CUDA
    for m in ("llama", "gemma"):
        line = next(x for x in out.splitlines() if f"model {m}: forward" in x)
        assert line.startswith("ok") and re.search(r"\(job \d+ on \S+\)", line), line   # ran inside the job
    assert not list((tmp_path / "artifacts" / "tiny" / ".check").iterdir())          # the job's files are removed


def test_check_task_is_cached_on_what_it_checked(pipeline_api, tmp_path):
    from prefect import flow

    from flows.check import preflight
    from lmsys.config import load_config
    cfg = load_config("tiny", {**SMALL, "models.teachers": ["llama"]})
    cfg["root"] = str(tmp_path)

    @flow
    def twice(cfg: dict, changed: dict):
        return [preflight(c, return_state=True) for c in (cfg, cfg, changed)]

    changed = load_config("tiny", {**SMALL, "models.teachers": ["llama"], "text.infer_max_length": 64})
    changed["root"] = str(tmp_path)
    first, again, other = twice(cfg, changed)
    assert first.is_completed() and first.name == "Completed", first
    assert again.name == "Cached" and again.result() == first.result()
    assert other.name == "Completed"


def test_flow_on_the_slurm_dask_runner_checks_on_its_gpu_worker(pipeline_api, slurm, bad_column_data, tmp_path):
    """run_pipeline starts the flow on its SLURM cluster at once (its worker jobs hold the node): the
    check's job part runs on a GPU worker of that cluster, and the unusable column still stops the flow."""
    root = tmp_path / "flow"
    with pytest.raises(Exception) as e:
        pipeline_api.run_pipeline(profile="tiny", runner="slurm", root=str(root), overrides={**SLURM, **bad_column_data})
    _assert_stopped_before_any_step(root, "data test: test.csv", e.value)
    table, _ = _check_artifact()
    rows = {r["check"]: r for r in table}
    assert rows["slurm: Prefect API from a compute node"]["status"] == "ok", table
    assert re.match(r"job \d+ on \S+", rows["slurm: GPU in the job"]["detail"]), table
    forward = [r for r in table if r["check"].startswith("model ") and "forward" in r["check"]]
    assert forward and all(r["status"] == "ok" and re.search(r"\(job \d+ on ", r["detail"]) for r in forward), forward
