"""What the model steps share: model specs, tokenizers, device, fold tables, encoding, the one
training entry (`fit`), and the work-dir pattern that keeps training outputs atomic while staying
resumable."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys import distributed
from lmsys.data.folds import fold_split
from lmsys.data.transforms import with_swaps
from lmsys.io import atomic_dir
from lmsys.paths import Layout
from lmsys.text import encode_rows


def spec(cfg: dict, name: str) -> dict:
    specs = cfg["models"]["specs"]
    if name not in specs:
        raise KeyError(f"model {name!r} has no spec in profile {cfg['profile']!r}; has {sorted(specs)}")
    return {"name": name, "seed": cfg["seed"], **specs[name]}


# torch, transformers and peft are imported inside the functions that use them, so that the CLI,
# DVC and Prefect can list and hash the steps without paying several seconds of imports.

def device():
    """This process's device: its current CUDA device (a data-parallel rank's own), else the CPU."""
    import torch
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def dtype():
    """bf16 on a GPU (the recipe), fp32 on a CPU (bf16 matmuls are slow and lossy there)."""
    import torch
    return torch.bfloat16 if device().type == "cuda" else torch.float32


def tokenizer(cfg: dict, layout: Layout, name: str):
    from lmsys import models
    return models.load_tokenizer(spec(cfg, name), layout.tokenizer)


def build(cfg: dict, layout: Layout, name: str, init_adapter: Path | None = None, trainable: bool = True):
    """(tokenizer, PeftModel) of model `name`, optionally continuing from an adapter."""
    from lmsys import models
    tok = tokenizer(cfg, layout, name)
    return tok, models.build_model(spec(cfg, name), tok, init_adapter=init_adapter, device=device(),
                                   trainable=trainable, dtype=dtype())


def table(layout: Layout, name: str) -> pd.DataFrame:
    return pd.read_parquet(layout.prepared / f"{name}.parquet")


def competition_and_external(layout: Layout) -> pd.DataFrame:
    return pd.concat([table(layout, "train"), table(layout, "external")], ignore_index=True)


def fold_tables(layout: Layout, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training part, validation part) of fold k, before filtering and swapping."""
    return fold_split(competition_and_external(layout), pd.read_csv(layout.folds_csv, dtype={"id": str}), k)


def filtered_train(cfg: dict, layout: Layout, k: int) -> pd.DataFrame:
    """Fold k's training part after step 2.5, with the A/B-swapped copies (column `swapped`),
    cut to train_teacher.subset_size originals (seeded) when set."""
    train, _ = fold_tables(layout, k)
    keep = set(pd.read_csv(layout.filtered(k) / "train_ids.csv", dtype={"id": str})["id"])
    train = train[train["id"].isin(keep)].reset_index(drop=True)
    n = cfg["train_teacher"]["subset_size"]
    if n is not None and n < len(train):
        train = train.sample(n=n, random_state=cfg["seed"]).reset_index(drop=True)
    return with_swaps(train)


def encode(cfg: dict, df: pd.DataFrame, tok, max_length: int, swap: bool = False) -> list[list[int]]:
    return encode_rows(df, tok, max_length, cfg["text"], swap=swap)


def labels(df: pd.DataFrame) -> np.ndarray:
    return df["label"].to_numpy(dtype=np.int64)


def fit(cfg: dict, layout: Layout, *, model: str, out: Path, section: str, train: pd.DataFrame,
        val: pd.DataFrame, init_adapter: Path | None, seed: int, desc: str, soft_targets: np.ndarray | None = None,
        sample_weight=None, loss_fn=None, before_publish=None) -> dict:
    """Train `model` (a name in models.specs) from `init_adapter` on the `train` rows with the settings of
    params.yaml's training `section` (post_pretrain | train_teacher | distill), keeping the best
    checkpoint by its log loss on `val`, and publish it as `out` (training_dir). Both row sets are
    encoded at text.train_max_length. soft_targets [N, n_teachers, 3], sample_weight and loss_fn go
    to the trainer (lmsys.train.train_classifier); before_publish(net, tok, work_dir), when given,
    writes more files into the run before it is published. In data-parallel ranks every rank trains
    and rank 0 alone publishes. Returns the trainer's metrics."""
    from lmsys.settings import training_settings
    from lmsys.train import TrainSet, ValSet, train_classifier
    tok, net = build(cfg, layout, model, init_adapter=init_adapter)
    length = cfg["text"]["train_max_length"]
    rows = TrainSet(encode(cfg, train, tok, length), labels(train), tok.pad_token_id, soft_targets, sample_weight)
    held_out = ValSet(encode(cfg, val, tok, length), labels(val))
    with training_dir(out, publish=distributed.is_main()) as work:
        metrics = train_classifier(net, rows, out_dir=work, settings=training_settings(cfg, section), val=held_out,
                                   loss_fn=loss_fn, seed=seed, desc=desc)
        if before_publish is not None and distributed.is_main():
            before_publish(net, tok, work)
    return metrics


@contextmanager
def training_dir(out: Path, publish: bool = True):
    """Train in `<out>.partial/` (kept across kills so the trainer resumes from its checkpoint),
    then publish final/ as `out/adapter` plus every top-level file (metrics.json, ...) in one rename
    (publish=False: leave that to another rank)."""
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    yield work
    if not publish:
        return
    with atomic_dir(out) as tmp:
        shutil.copytree(work / "final", tmp / "adapter")
        for f in work.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(work, ignore_errors=True)


def adapter(step_dir: Path) -> Path:
    """The published adapter inside a training step's output dir."""
    return step_dir / "adapter"
