"""Resumable sharded inference (teacher-logits, filter scoring): shards saved as they finish, a
SIGKILLed job resumes at its last finished shard, and the output is byte-identical to an
uninterrupted run and bit-identical to the unsharded predict_logits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmsys.infer import predict_logits, predict_logits_resumable
from lmsys.models import build_model
from train_worker import SPEC, make_task

TESTS = Path(__file__).resolve().parent


def _worker(tok_dir: Path, work: Path, out: Path, sleep_s: float) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(TESTS / "infer_worker.py"), str(tok_dir), str(work), str(out),
                             str(sleep_s)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_run_resumes_at_last_shard_byte_identical(tmp_path, tok_dir):
    """Kill the job (SIGKILL) after its first shards are saved; the rerun loads them, computes the rest,
    and writes a file byte-identical to an uninterrupted run's."""
    killed = _worker(tok_dir, tmp_path / "work-killed", tmp_path / "killed.npy", sleep_s=0.3)
    straight = _worker(tok_dir, tmp_path / "work-straight", tmp_path / "straight.npy", sleep_s=0.0)
    deadline = time.time() + 120
    while len(list((tmp_path / "work-killed").glob("shard-*.npy"))) < 2:
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no shard appeared"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed.npy").exists()                       # it died mid-run
    done = len(list((tmp_path / "work-killed").glob("shard-*.npy")))
    assert 2 <= done < 6
    rerun = _worker(tok_dir, tmp_path / "work-killed", tmp_path / "killed.npy", sleep_s=0.0)
    for p in (rerun, straight):
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    info = json.loads((tmp_path / "killed.npy.json").read_text())
    assert info == {"shards": 6, "shards_resumed": done, "rows": 96}
    assert json.loads((tmp_path / "straight.npy.json").read_text())["shards_resumed"] == 0
    assert (tmp_path / "killed.npy").read_bytes() == (tmp_path / "straight.npy").read_bytes()


def test_shards_equal_unsharded_and_stale_shards_are_discarded(tmp_path, tok):
    torch.set_num_threads(1)
    model = build_model(SPEC, tok, trainable=False)
    ids, _ = make_task(50, len(tok), seed=3, min_len=4, max_len=30)
    want = predict_logits(model, ids, tok.pad_token_id, 4)
    got, info = predict_logits_resumable(model, ids, tok.pad_token_id, 4, tmp_path / "w", shard_rows=10, key="a")
    assert info == {"shards": 5, "shards_resumed": 0, "rows": 50}    # 10 rows -> 12 (3 whole batches)
    assert got.tobytes() == want.tobytes()
    again, info = predict_logits_resumable(model, ids, tok.pad_token_id, 4, tmp_path / "w", shard_rows=10, key="a")
    assert info["shards_resumed"] == 5 and again.tobytes() == want.tobytes()
    # another model key, other rows or another batch size: the old shards are not reused
    for kw in ({"key": "b"}, {"key": "a", "batch_size": 2}):
        bs = kw.pop("batch_size", 4)
        _, info = predict_logits_resumable(model, ids, tok.pad_token_id, bs, tmp_path / "w", shard_rows=10, **kw)
        assert info["shards_resumed"] == 0
    _, info = predict_logits_resumable(model, ids[:-1], tok.pad_token_id, 2, tmp_path / "w", shard_rows=10, key="a")
    assert info["shards_resumed"] == 0
    with pytest.raises(ValueError, match="shard_rows"):
        predict_logits_resumable(model, ids, tok.pad_token_id, 4, tmp_path / "w", shard_rows=0)
    assert predict_logits_resumable(model, [], tok.pad_token_id, 4, tmp_path / "e")[0].shape == (0, 3)
