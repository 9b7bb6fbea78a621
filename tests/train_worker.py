"""A tiny synthetic classification task and a training run over it, importable by the tests and
runnable as a subprocess (for the kill-and-resume test):

    python tests/train_worker.py TOKENIZER_DIR OUT_DIR [SLEEP_S]

The label is readable from the tokens: each row holds exactly one marker token, A_MARK -> 0
(A wins), B_MARK -> 1 (B wins), TIE_MARK -> 2 (tie), at a random position among filler tokens.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = "alpha beta gamma delta river stone cloud green quick slow answer question model".split()
SPEC = {"kind": "tiny-llama", "hidden": 64, "layers": 2, "heads": 4, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
RESUME_CFG = {"epochs": 2, "lr": 3e-3, "warmup_steps": 2, "batch_size": 8, "grad_accum": 2,
              "checkpoint_every": 2, "eval_every": None}
# what a test leaves out of its trainer settings (params.yaml always states every one)
TRAINER_DEFAULTS = {"epochs": 1, "lr": 1e-3, "warmup_steps": 0, "batch_size": 8, "grad_accum": 1, "max_steps": None,
                    "eval_every": None, "checkpoint_every": None, "packing": False, "pack_tokens": 4096}


def settings(**over):
    """lmsys.settings.TrainerSettings with TRAINER_DEFAULTS under `over`."""
    from lmsys.settings import TrainerSettings
    return TrainerSettings(**{**TRAINER_DEFAULTS, **over})


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=20)) for _ in range(n)]


def make_task(n: int, vocab: int, seed: int, probs=(0.5, 0.3, 0.2), min_len: int = 6, max_len: int = 20):
    """(ids rows, labels [n]): filler ids in [7, vocab), one marker id (4, 5 or 6) per row."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=list(probs))
    rows = []
    for y in labels:
        row = rng.integers(7, vocab, size=int(rng.integers(min_len, max_len + 1))).tolist()
        row.insert(int(rng.integers(0, len(row) + 1)), 4 + int(y))
        rows.append([1] + row)  # <bos> first, like the tokenizer
    return rows, labels.astype(np.int64)


def run(tokenizer_dir: str, out_dir: str, sleep_s: float = 0.0) -> dict:
    import torch
    from lmsys.models import build_model, load_tokenizer
    from lmsys.train import TrainSet, cross_entropy_loss, train_classifier

    torch.set_num_threads(1)  # same thread count in every run: same float reductions
    tok = load_tokenizer(SPEC, tokenizer_dir)
    model = build_model(SPEC, tok)
    ids, labels = make_task(72, len(tok), seed=1)  # 9 batches of 8 -> 5 steps/epoch, last one short

    def slow_loss(*args):
        time.sleep(sleep_s)  # gives the test time to kill the run between checkpoints
        return cross_entropy_loss(*args)

    return train_classifier(model, TrainSet(ids, labels, tok.pad_token_id), out_dir=out_dir, settings=settings(**RESUME_CFG),
                            loss_fn=slow_loss, seed=3, desc="worker")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
