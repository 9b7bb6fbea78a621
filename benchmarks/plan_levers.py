"""Issue 19's levers priced under one token model, and the step widths of the full profile chosen.

    python benchmarks/plan_levers.py [--gpus 8] [--out benchmarks/results/plan_levers.json]

Nothing runs on a GPU: every figure is `lmsys plan`'s (lmsys.plan.estimate) for the full profile on
`--gpus` H200s, with params.yaml overrides that switch each lever off or on:
  1. today's code (main at d5c1397): padded micro-batches, teachers evaluated every 400 steps, one GPU
     a task, inference on the padded path through nf4 builds prepared for training (fp32 casts);
  2.-6. the levers added one at a time, in the order of the table; "alone" = that lever on top of row 1.
Then every combination of step widths in WIDTHS is scheduled (the task estimates computed once per
step and width, lmsys.schedule.list_schedule on the task graph), and those meeting the issue's
1,900 GPU-hours and 10.5 days are listed with the Pareto front of GPU-hours against days.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmsys import plan as cost_plan                       # noqa: E402
from lmsys import schedule                                # noqa: E402
from lmsys.config import load_config                      # noqa: E402
from lmsys.steps import recipe                            # noqa: E402

TODAY = {"trainer.packing": False, "train_teacher.eval_every": 400, "orchestration.step_gpus": {},
         "infer.packed": False, "orchestration.estimate.code": {"nf4_inference_bf16": False}}
LEVERS = [   # (name, overrides on top of the previous row, where it stands)
    ("teacher evaluation once, at the end (train_teacher.eval_every null)", {"train_teacher.eval_every": None},
     "works on main: lmsys.train evaluates once at the end when eval_every is null (config only)"),
    ("packed training (trainer.packing, 4096-token packs)", {"trainer.packing": True},
     "not on main: issue 19 item 1"),
    ("nf4 inference builds without peft's fp32 casts", {"orchestration.estimate.code": {"nf4_inference_bf16": True}},
     "issue 19 item 3: lmsys.models builds inference-only nf4 models without peft's preparation"),
    ("packed inference in filter-score, teacher-logits, OOF, predict", {"infer.packed": "auto"},
     "issue 19 item 4: infer.packed auto (packed on a verified capability: the H200's 9.0)"),
    ("data-parallel steps (the full profile's orchestration.step_gpus, efficiency 0.9)",
     {"orchestration.step_gpus": load_config("full")["orchestration"]["step_gpus"]},
     "not on main: issue 19 item 2"),
]
WIDTHS = {"post-pretrain": (2, 4, 8), "post-pretrain-student": (1, 8), "filter-score": (1, 8),
          "train-teacher": (1, 2, 4, 8), "teacher-logits": (1, 2, 4, 8), "distill": (1, 2, 4, 8)}


def price(overrides: dict, gpus: int) -> dict:
    e = cost_plan.estimate(load_config("full", overrides), gpus)
    by_step: dict[str, float] = {}
    for t in e["tasks"]:
        by_step[t.step] = by_step.get(t.step, 0.0) + t.gpu_hours
    return {"gpu_hours": round(e["gpu_hours"], 1), "days": round(e["wall_s"] / 86400, 2),
            "by_step": {k: round(v, 1) for k, v in by_step.items() if v}}


def lever_table(gpus: int) -> list[dict]:
    cumulative = dict(TODAY)
    rows = [{"lever": "today's code (main at d5c1397), re-priced", "status": "main", **price(TODAY, gpus)}]
    today = rows[0]["gpu_hours"]
    for name, over, status in LEVERS:
        cumulative.update(over)
        row = {"lever": f"+ {name}", "status": status, **price(cumulative, gpus)}
        row["alone_saves"] = round(today - price({**TODAY, **over}, gpus)["gpu_hours"], 1)
        rows.append(row)
    return rows


def width_search(gpus: int) -> list[dict]:
    """Every combination of WIDTHS scheduled on `gpus` GPUs: GPU-hours and days of each."""
    cfg = load_config("full")
    deps, rows, tasks = recipe.graph(cfg), cost_plan.dataset_rows(cfg), recipe.tasks_of(cfg)
    priced: dict[tuple, cost_plan.TaskEstimate] = {}
    out = []
    for combo in itertools.product(*WIDTHS.values()):
        widths = dict(zip(WIDTHS, combo))
        cfg = load_config("full", {"orchestration.step_gpus": widths})
        ests = []
        for name, keys in tasks:
            key = (name, tuple(sorted(keys.items())), widths.get(name, 1))
            if key not in priced:
                priced[key] = cost_plan.task_estimate(cfg, name, keys, rows, gpus, None)
            ests.append(priced[key])
        placed = schedule.list_schedule([schedule.Job(t.task, t.seconds, t.width) for t in ests], deps, gpus,
                                        int(cfg["orchestration"]["slurm"]["cpu_jobs"] or 1))
        out.append({"widths": widths, "gpu_hours": round(sum(t.gpu_hours for t in ests), 1),
                    "days": round(max(end for _, end in placed.values()) / 86400, 2)})
    return out


def pareto(results: list[dict]) -> list[dict]:
    front, best = [], float("inf")
    for r in sorted(results, key=lambda r: (r["days"], r["gpu_hours"])):
        if r["gpu_hours"] < best:
            best = r["gpu_hours"]
            front.append(r)
    return front


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "plan_levers.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    levers = lever_table(args.gpus)
    print("| lever | status | GPU-hours | days on 8 GPUs | alone: GPU-h saved vs today |\n|---|---|---|---|---|")
    for r in levers:
        print(f"| {r['lever']} | {r['status']} | {r['gpu_hours']:,.0f} | {r['days']:.2f} | {r.get('alone_saves', '-')} |")
    search = width_search(args.gpus)
    meets = sorted((r for r in search if r["gpu_hours"] <= 1900 and r["days"] <= 10.5), key=lambda r: r["days"])
    print(f"\n{len(search)} width combinations; {len(meets)} meet 1,900 GPU-h and 10.5 days:")
    for r in meets:
        print(f"  {r['gpu_hours']:,.1f} GPU-h  {r['days']:.2f} d  {r['widths']}")
    print("Pareto front (fewest GPU-hours for the days):")
    for r in pareto(search):
        print(f"  {r['gpu_hours']:,.1f} GPU-h  {r['days']:.2f} d  {r['widths']}")
    Path(args.out).write_text(json.dumps({"gpus": args.gpus, "levers": levers, "meets": meets,
                                          "pareto": pareto(search), "combinations": len(search),
                                          "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
