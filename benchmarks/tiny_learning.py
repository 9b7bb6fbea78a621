"""What a tiny random-init classifier learns from the demo: one training run on fold 0 of the tiny
profile's data, printed as its validation log-loss curve (issue 10's question: what can the models
see after truncation, and what can they learn from ~600 rows).

    python benchmarks/tiny_learning.py ROOT '{"full": 1, "lr": 1e-3, "epochs": 3}'

ROOT is a run root whose demo-data, prepare, folds and tokenizer steps have run (e.g. `lmsys run
--root ROOT` or the steps one by one). Options (JSON): model (llama|qwen|gemma, default gemma),
full (train every weight, not only LoRA + head), freeze_embeddings, layers, lr, epochs, batch_size,
max_length (train tokens), prompt_tokens, length_fields (template with {a_words}/{b_words}),
eval_every, threads, profile (tiny, or small for a root of benchmarks/small_profile.py: model minilm).
Prints one JSON line: the options, the val curve, best, seconds.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from lmsys import models
from lmsys.config import load_config
from lmsys.data.transforms import with_swaps
from lmsys.paths import Layout
from lmsys.steps import common
from lmsys.settings import TrainerSettings
from lmsys.train import TrainSet, ValSet, train_classifier

LENGTH_TEMPLATE = ('User question:\n"""{prompt}"""\nAnswer A ({a_words} words):\n"""{a}"""\n'
                   'Answer B ({b_words} words):\n"""{b}"""')


def main(root: str, opts: dict) -> dict:
    torch.set_num_threads(int(opts.get("threads", 1)))
    profile = opts.get("profile", "tiny")
    cfg = load_config(profile, {})
    cfg["root"] = root
    if opts.get("length_fields"):
        cfg["text"]["template"] = LENGTH_TEMPLATE
    cfg["text"]["prompt_tokens"] = int(opts.get("prompt_tokens", cfg["text"]["prompt_tokens"]))
    layout = Layout(profile, root)
    train, val = common.fold_tables(layout, 0)
    train = with_swaps(train)
    name = opts.get("model", "gemma")
    spec = {**common.spec(cfg, name), **({"layers": opts["layers"]} if "layers" in opts else {})}
    tok = common.tokenizer(cfg, layout, name)
    net = models.build_model(spec, tok)
    if opts.get("full"):
        net.requires_grad_(True)
        for n, p in net.named_parameters():
            if opts.get("freeze_embeddings") and "embed_tokens" in n:
                p.requires_grad_(False)
    length = int(opts.get("max_length", cfg["text"]["train_max_length"]))
    settings = TrainerSettings(epochs=opts.get("epochs", 3), lr=opts.get("lr", 2e-3), warmup_steps=opts.get("warmup_steps", 2),
                               batch_size=opts.get("batch_size", 16), grad_accum=1, max_steps=None,
                               eval_every=opts.get("eval_every", 20), checkpoint_every=None, packing=False, pack_tokens=4096)
    t0 = time.perf_counter()
    m = train_classifier(net, TrainSet(common.encode(cfg, train, tok, length), common.labels(train), tok.pad_token_id),
                         out_dir=f"{root}/bench-tiny-learning/{time.time_ns()}", settings=settings,
                         val=ValSet(common.encode(cfg, val, tok, length), common.labels(val)), seed=1)
    return {"opts": opts, "n_train": len(train), "n_val": len(val),
            "val_curve": [[e["step"], round(e["log_loss"], 4)] for e in m["evals"]],
            "best": round(m["best_val_log_loss"], 4), "train_loss_last": round(m["train_loss_last"], 4),
            "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}"))))
