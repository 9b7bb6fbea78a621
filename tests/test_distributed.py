"""Data-parallel steps on gloo (lmsys.distributed): 2 ranks train the adapter one process trains when it
accumulates the ranks' shares as micro-batches, their first-step gradients are one process's, a killed
2-rank run resumes exactly, and 2 ranks write the inference shards one process writes, byte for byte."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_worker import CFG, N_ROWS, env, task
from safetensors.torch import load_file
from train_worker import SPEC, settings

from lmsys import distributed
from lmsys.infer import predict_logits_resumable
from lmsys.models import build_model
from lmsys.train import _start, _train_step, cross_entropy_loss, epoch_groups, micro_batches, step_gradients

TESTS = Path(__file__).resolve().parent
SEED = 3


@pytest.fixture
def rank_env(monkeypatch):
    """What launch() hands the ranks: this test's modules importable, one torch thread each (as here)."""
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # the same float reductions as in the ranks
    yield
    torch.set_num_threads(threads)


def test_deal_gives_the_longest_first_to_the_least_loaded_rank():
    tokens = [100, 900, 300, 300, 500, 50, 800]
    shares = distributed.deal(tokens, 3)
    # 900 -> r0, 800 -> r1, 500 -> r2, 300 -> r2 (500), 300 -> r1 (800, tie with r2: the lower rank), 100 -> r2, 50 -> r0
    assert [s.tolist() for s in shares] == [[1, 5], [6, 3], [4, 2, 0]]
    assert [sum(tokens[i] for i in s) for s in shares] == [950, 1100, 900]
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(np.exp(rng.normal(np.log(589), 0.59, 64))), 1, 1024)     # one recipe step, 8 ranks
    loads = [lengths[s].sum() for s in distributed.deal(lengths, 8)]
    equal_counts = [lengths[i::8].sum() for i in range(8)]
    assert np.mean(loads) / max(loads) > 0.97 > np.mean(equal_counts) / max(equal_counts)
    assert [len(s) for s in distributed.deal([5, 3], 4)] == [1, 1, 0, 0]


def one_process_run(tok, rows, n_ranks: int):
    """The reference: one process whose micro-batches of each optimizer step are the shares the ranks
    get (distributed.deal by tokens, each share one pack here), accumulated in rank order."""
    model = build_model(SPEC, tok)
    s = settings(**CFG)
    run = _start(model, rows, TESTS, s, None, SEED)
    batches = micro_batches(model, rows, s, "cpu")
    lengths = np.array([len(r) for r in rows.ids])
    for epoch in range(s.epochs):
        for group in epoch_groups(N_ROWS, epoch, SEED, s.batch_size, s.grad_accum):
            step_rows = np.concatenate(group)
            shares = [step_rows[sh] for sh in distributed.deal(lengths[step_rows], n_ranks)]
            micro = [m for sh in shares if len(sh) for m in batches.split([sh])]
            assert len(micro) == sum(1 for sh in shares if len(sh))      # a share is one micro-batch (exact sum)
            _train_step(model, micro, step_rows, rows, cross_entropy_loss, run.opt, run.lr_schedule, batches)
    from peft import get_peft_model_state_dict
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_adapter_equals(final: Path, reference: dict) -> None:
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert saved.keys() == reference.keys() and any("lora_A" in k for k in saved)
    for k in saved:
        assert torch.equal(saved[k], reference[k]), k


def test_two_ranks_train_what_one_process_accumulating_their_shares_trains(tmp_path, tok_dir, rank_env):
    """Every step's rows dealt to 2 gloo ranks by tokens, gradients summed: the final adapter is bit for bit the
    one-process run's whose micro-batches are those shares; the first step's gradients are a plain process's
    (today's micro-batches) to 1e-5, relative; and the ranks trained on disjoint halves of each step."""
    out = distributed.launch("ddp_worker:first_step_rank", {"tok_dir": str(tok_dir), "out": str(tmp_path / "g.pt"),
                                                           "seed": SEED}, 2, tmp_path / "job-grads")
    train = distributed.launch("ddp_worker:train_rank", {"tok_dir": str(tok_dir), "out": str(tmp_path / "run"),
                                                        "seed": SEED}, 2, tmp_path / "job-train")
    tok, rows = task(str(tok_dir))
    assert train["steps"] == 6 and train["resumed_from_step"] is None and train["real_per_computed_token"] == 1.0
    assert_adapter_equals(tmp_path / "run" / "final", one_process_run(tok, rows, 2))

    model = build_model(SPEC, tok)                              # one plain process, the trainer's own micro-batches
    s = settings(**CFG)
    group = epoch_groups(N_ROWS, 0, SEED, s.batch_size, s.grad_accum)[0]
    batches = micro_batches(model, rows, s, "cpu")
    loss, _ = step_gradients(model, batches.split(group), np.concatenate(group), rows, cross_entropy_loss, batches)
    ranked = torch.load(tmp_path / "g.pt")
    assert out["loss"] == pytest.approx(loss, rel=1e-6)
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    for k, g in grads.items():
        assert (ranked[k] - g).norm() <= 1e-5 * g.norm(), k
    assert all(g.norm() > 0 for k, g in grads.items() if "lora_B" in k or "score" in k)   # (LoRA A's are 0: B starts at 0)
    rank0 = set(out["my_rows"])
    assert 0 < len(rank0) < len(np.concatenate(group)) and rank0 < set(np.concatenate(group).tolist())


def _launcher(payload: dict, job_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "ddp_worker.py"), "train", json.dumps(payload), str(job_dir)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_two_ranks_killed_after_a_checkpoint_resume_exactly(tmp_path, tok_dir, rank_env):
    """SIGKILL the task's process group (launcher and ranks) once a checkpoint exists; the rerun continues
    it under 2 ranks and ends on the uninterrupted adapter, bit for bit."""
    payload = {"tok_dir": str(tok_dir), "out": str(tmp_path / "run"), "seed": SEED, "sleep_s": 0.4}
    killed = _launcher(payload, tmp_path / "job")
    deadline = time.time() + 300              # two ranks import torch, transformers and peft first
    while not (tmp_path / "run" / "checkpoint" / "state.json").exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    time.sleep(1.0)
    assert not (tmp_path / "run" / "final").exists()
    step = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["global_step"]
    assert step in (2, 4)
    m = distributed.launch("ddp_worker:train_rank", {**payload, "sleep_s": 0.0}, 2, tmp_path / "job")
    assert m["resumed_from_step"] == step and m["steps"] == 6
    tok, rows = task(str(tok_dir))
    assert_adapter_equals(tmp_path / "run" / "final", one_process_run(tok, rows, 2))


def test_two_ranks_write_the_shards_one_process_writes(tmp_path, tok_dir, rank_env):
    """Whole shards dealt to 2 ranks, one of them already there (a resumed job): every shard file equals
    one process's byte for byte, and each rank gets all the logits."""
    from lmsys.models import load_tokenizer
    from train_worker import make_task
    tok = load_tokenizer(SPEC, tok_dir)
    ids, _ = make_task(45, len(tok), seed=12, min_len=2, max_len=60)
    alone, info = predict_logits_resumable(build_model(SPEC, tok, trainable=False), ids, tok.pad_token_id, 4,
                                           tmp_path / "one", shard_rows=8, key="k")
    assert info["shards"] == 6
    (tmp_path / "two").mkdir()
    for name in ("manifest.json", "shard-00002.npy"):                     # the job was killed after shard 2
        (tmp_path / "two" / name).write_bytes((tmp_path / "one" / name).read_bytes())
    got = distributed.launch("ddp_worker:infer_rank", {"tok_dir": str(tok_dir), "rows": 45, "shard_rows": 8,
                                                      "work_dir": str(tmp_path / "two")}, 2, tmp_path / "job")
    assert got == {"shards": 6, "shards_resumed": 1, "rows": 45}
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    logs = [(tmp_path / "job" / f"rank-{r}.log").read_text() for r in (0, 1)]
    assert all("Traceback" not in text for text in logs)


def test_all_sum_adds_every_tensor_over_the_ranks_bucket_by_bucket(tmp_path, rank_env):
    sizes = [5, 3, 9, 1, 4]                   # buckets of 8: [5, 3], [9] (larger than a bucket), [1, 4]
    got = distributed.launch("ddp_worker:sum_in_buckets", {"sizes": sizes, "bucket": 8}, 2, tmp_path / "job")
    assert got == {"sums": [[3.0]] * len(sizes)}


def test_a_failing_rank_stops_the_step_and_is_named(tmp_path, rank_env):
    t0 = time.time()
    with pytest.raises(RuntimeError, match="rank 1 .* exited with 1(.|\n)*rank 1 gives up"):
        distributed.launch("ddp_worker:fail_on_rank_1", {}, 2, tmp_path / "job")
    assert time.time() - t0 < 120             # rank 0, stuck in its barrier, was killed, not waited for


def test_a_step_of_width_2_runs_as_ranks_and_publishes_what_one_process_does(tmp_path, rank_env):
    """orchestration.step_gpus: the task's run_step launches the step as 2 ranks; post-pretrain (training)
    publishes one adapter, filter-score (inference) one table, each as close to the one-process step's as
    float rounding allows (the ranks' micro-batches differ), and nothing of the ranks is left behind."""
    import pandas as pd
    from lmsys.config import load_config
    from lmsys.paths import Layout
    from lmsys.steps.recipe import run_step
    roots = {}
    for width in (1, 2):
        root = tmp_path / f"w{width}"
        cfg = {**load_config("tiny", {"orchestration.step_gpus": {"post-pretrain": width, "filter-score": width},
                                      "demo.ut_rows": 120}), "root": str(root)}
        layout = Layout.of(cfg)
        for name in ("demo-data", "prepare", "tokenizer"):
            run_step(name, cfg, layout)
        trained = run_step("post-pretrain", cfg, layout, model="llama")
        scored = run_step("filter-score", cfg, layout, model="llama")
        assert trained.metrics.get("ranks") == scored.metrics.get("ranks") == (2 if width == 2 else None)
        assert not (layout.art / ".ranks").exists() or not any((layout.art / ".ranks").iterdir())
        roots[width] = layout
    one, two = roots[1], roots[2]
    a = load_file(str(one.post_pretrain("llama") / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two.post_pretrain("llama") / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
    assert json.loads((two.post_pretrain("llama") / "metrics.json").read_text())["steps"] == \
        json.loads((one.post_pretrain("llama") / "metrics.json").read_text())["steps"]
    sa, sb = pd.read_parquet(one.filter_scores("llama")), pd.read_parquet(two.filter_scores("llama"))
    assert sa["id"].tolist() == sb["id"].tolist()
    np.testing.assert_allclose(sa[["p_a", "p_b", "p_tie"]].to_numpy(), sb[["p_a", "p_b", "p_tie"]].to_numpy(), atol=1e-4)
