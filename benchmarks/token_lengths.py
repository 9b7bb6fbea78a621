"""Token lengths of a run's datasets under the recipe's template: the figures of orchestration.estimate.tokens.

    python benchmarks/token_lengths.py [--profile tiny] [--root DIR] [--model gemma] [--cap 2000]

Runs the data steps (demo data when data.train is null, prepare, tokenizer) in ROOT (a temporary
directory by default, removed after), encodes every row of train / external / ut / test with the model's tokenizer
through lmsys.text.encode_rows at `--cap` tokens, and prints each dataset's rows, mean, median, p90
and max (the plan's log-normal takes the median and p90).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmsys.config import load_config          # noqa: E402
from lmsys.paths import Layout                # noqa: E402
from lmsys.steps import common                # noqa: E402
from lmsys.steps.recipe import run_step       # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--root", help="run root (default: a temporary directory)")
    ap.add_argument("--model", help="whose tokenizer (default: the student)")
    ap.add_argument("--cap", type=int, default=2000)
    args = ap.parse_args()
    if args.root:
        return measure(args, args.root)
    with tempfile.TemporaryDirectory(prefix="token-lengths-") as root:
        return measure(args, root)


def measure(args, root: str) -> int:
    cfg = load_config(args.profile)
    cfg["root"] = root
    layout = Layout.of(cfg)
    for step in ("demo-data", "prepare", "tokenizer") if cfg["data"]["train"] is None else ("prepare", "tokenizer"):
        run_step(step, cfg, layout)
    tok = common.tokenizer(cfg, layout, args.model or cfg["models"]["student"])
    for name in ("train", "external", "ut", "test"):
        n = np.array([len(ids) for ids in common.encode(cfg, common.table(layout, name), tok, args.cap)])
        print(f"{name}: {len(n)} rows, mean {n.mean():.1f}, median {np.median(n):.1f}, p90 {np.percentile(n, 90):.1f}, "
              f"max {n.max()} tokens at {args.cap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
