"""What the data-parallel tests run inside torch.distributed ranks (lmsys.distributed.launch targets
"ddp_worker:<function>", called with a JSON payload), and a launcher for the kill-and-resume test:

    python tests/ddp_worker.py train PAYLOAD_JSON JOB_DIR      # 2 ranks of train_rank, then exit

The ranks import this module by name: tests/ must be on their PYTHONPATH (env()).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from train_worker import SPEC, make_task, settings  # noqa: E402

# one optimizer step = 16 rows of 3..42 tokens; 512-token packs hold a rank's whole share (one micro-batch)
CFG = {"epochs": 2, "lr": 3e-3, "warmup_steps": 1, "batch_size": 8, "grad_accum": 2, "checkpoint_every": 2,
       "packing": True, "pack_tokens": 512}
N_ROWS = 40                                  # 3 steps an epoch, the last of 8 rows


def env() -> dict:
    """The environment ranks need: this module and the project importable, one torch thread each."""
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def task(tok_dir: str):
    from lmsys.models import load_tokenizer
    from lmsys.train import TrainSet
    tok = load_tokenizer(SPEC, tok_dir)
    ids, y = make_task(N_ROWS, len(tok), seed=11, min_len=2, max_len=40)
    return tok, TrainSet(ids, y, tok.pad_token_id)


def first_step_rank(payload: dict) -> dict:
    """The first optimizer step's gradients, summed over the ranks (rank 0 saves them)."""
    import torch
    from lmsys import distributed
    from lmsys.models import build_model
    from lmsys.train import cross_entropy_loss, epoch_groups, micro_batches, rank_micro_batches, step_gradients
    torch.set_num_threads(1)
    tok, rows = task(payload["tok_dir"])
    model = build_model(SPEC, tok)
    s = settings(**CFG)
    batches = micro_batches(model, rows, s, "cpu")
    group = epoch_groups(N_ROWS, 0, payload["seed"], s.batch_size, s.grad_accum)[0]
    micro = rank_micro_batches(batches, group, s.batch_size)
    loss, _ = step_gradients(model, micro, np.concatenate(group), rows, cross_entropy_loss, batches)
    if distributed.is_main():
        torch.save({k: p.grad for k, p in model.named_parameters() if p.requires_grad}, payload["out"])
    return {"loss": loss, "my_rows": sorted(int(i) for idx in micro for i in idx)}


def train_rank(payload: dict) -> dict:
    """A whole training run (CFG) in every rank; sleep_s per micro-batch leaves time to kill it."""
    import torch
    from lmsys.models import build_model
    from lmsys.train import cross_entropy_loss, train_classifier
    torch.set_num_threads(1)
    tok, rows = task(payload["tok_dir"])

    def slow_loss(*args):
        time.sleep(payload.get("sleep_s", 0.0))
        return cross_entropy_loss(*args)

    m = train_classifier(build_model(SPEC, tok), rows, out_dir=payload["out"], settings=settings(**CFG),
                         loss_fn=slow_loss, seed=payload["seed"])
    return {k: m[k] for k in ("steps", "resumed_from_step", "train_loss_first", "real_per_computed_token")}


def infer_rank(payload: dict) -> dict:
    """Resumable sharded inference of a frozen tiny model on payload's rows."""
    import torch
    from lmsys.infer import predict_logits_resumable
    from lmsys.models import build_model, load_tokenizer
    torch.set_num_threads(1)
    tok = load_tokenizer(SPEC, payload["tok_dir"])
    ids, _ = make_task(payload["rows"], len(tok), seed=12, min_len=2, max_len=60)
    _, info = predict_logits_resumable(build_model(SPEC, tok, trainable=False), ids, tok.pad_token_id, 4,
                                       payload["work_dir"], shard_rows=payload["shard_rows"], key="k")
    return info


def sum_in_buckets(payload: dict) -> dict:
    """Rank r holds tensors of r + 1; summed in buckets smaller than some of them."""
    import torch
    from lmsys import distributed
    ts = [torch.full((n,), float(distributed.rank() + 1)) for n in payload["sizes"]]
    distributed.all_sum(ts, bucket=payload["bucket"])
    return {"sums": [sorted(set(t.tolist())) for t in ts]}


def fail_on_rank_1(payload: dict) -> dict:
    """Rank 1 raises; rank 0 waits in a collective that will never complete."""
    from lmsys import distributed
    if distributed.rank() == 1:
        raise RuntimeError("rank 1 gives up")
    distributed.barrier()
    return {}


if __name__ == "__main__":
    from lmsys.distributed import launch
    if sys.argv[1] == "train":
        launch("ddp_worker:train_rank", json.loads(sys.argv[2]), 2, sys.argv[3])
