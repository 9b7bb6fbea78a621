"""A resumable sharded inference run over a tiny classifier, runnable as a subprocess (for the
kill-and-resume test):

    python tests/infer_worker.py TOKENIZER_DIR WORK_DIR OUT_FILE [SLEEP_S]

Writes the logits to OUT_FILE (.npy) and the run's info beside it (OUT_FILE.json). SLEEP_S pauses
every forward pass so that the test can kill the run between shards.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

N_ROWS, BATCH, SHARD_ROWS = 96, 8, 16        # 6 shards of 2 batches


def run(tokenizer_dir: str, work_dir: str, out_file: str, sleep_s: float = 0.0) -> dict:
    import numpy as np
    import torch

    from lmsys.infer import predict_logits_resumable
    from lmsys.models import build_model, load_tokenizer
    from train_worker import SPEC, make_task

    torch.set_num_threads(1)                  # same thread count in every run: same float reductions
    tok = load_tokenizer(SPEC, tokenizer_dir)
    model = build_model(SPEC, tok, trainable=False)
    if sleep_s:
        model.register_forward_pre_hook(lambda *_: time.sleep(sleep_s))
    ids, _ = make_task(N_ROWS, len(tok), seed=7, min_len=4, max_len=40)
    logits, info = predict_logits_resumable(model, ids, tok.pad_token_id, BATCH, work_dir, SHARD_ROWS,
                                            key="tiny-llama-worker", desc="worker")
    with open(out_file, "wb") as f:
        np.save(f, logits)
    Path(out_file + ".json").write_text(json.dumps(info))
    return info


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
