"""`lmsys plan`: every task priced in tokens (each dataset's lengths, the trainer's padded or packed
micro-batches, its evaluation passes), each step at its GPU width, scheduled by the task graph on N GPUs,
with job walltimes, segments, host memory and disk, and the serving estimate on a named card set."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from lmsys import schedule, token_model
from lmsys.cli import main
from lmsys.config import load_config
from lmsys.plan import estimate, job_template, model_rates, step_timeout, walltime_s, walltime_text
from lmsys.cards import parse_cards
from lmsys.serve_estimate import row_bytes, serving_estimate
from lmsys.steps.recipe import STEPS, graph, task_label, tasks_of

RECIPE_LENGTHS = ((589.0, 1240.0, 1.0),)           # docs/recipe.md: the Kaggle rows' median and p90


# ---------------------------------------------------------------- the token model

def test_padded_batches_compute_what_the_issue_measured_and_packs_compute_real_tokens():
    """On the recipe's lengths cut at 1024: 624 real tokens a row; random micro-batches of 4 padded to
    their longest compute 0.69 real per computed token (909 a row), of 8 0.63; packing an optimizer step
    of 64 rows into 4096-token packs computes >= 0.95 (issue 19)."""
    padded4 = token_model.training_tokens(RECIPE_LENGTHS, 1024, {"batch_size": 4, "grad_accum": 16})
    assert padded4["real"] == pytest.approx(624, abs=3)
    assert padded4["efficiency"] == pytest.approx(0.687, abs=0.01) and padded4["computed"] == pytest.approx(909, abs=10)
    rows = token_model.mixture(RECIPE_LENGTHS, 1024)
    assert token_model.padded_efficiency(rows, 8) == pytest.approx(0.63, abs=0.01)
    assert token_model.padded_efficiency(rows, 1) == 1.0
    packed = token_model.training_tokens(RECIPE_LENGTHS, 1024, {"batch_size": 4, "grad_accum": 16, "packing": True,
                                                                 "pack_tokens": 4096})
    assert packed["real"] == padded4["real"] and 0.95 <= packed["efficiency"] < 1.0
    assert token_model.mean_tokens(RECIPE_LENGTHS, 2000) == pytest.approx(683, abs=8)   # the recipe's mean at 2000


def test_pack_lengths_hold_every_row_within_the_budget_in_flex_blocks():
    rows = np.array([1000, 900, 800, 300, 200, 100, 4096])
    packs = token_model.pack_lengths(rows, 4096)
    assert all(p % 128 == 0 and p <= 4096 for p in packs)
    assert sum(packs) >= rows.sum() and len(packs) == 2          # 4096 alone; the rest (3300) in one pack
    with pytest.raises(ValueError, match="does not fit trainer.pack_tokens=4096"):
        token_model.pack_lengths(np.array([4097]), 4096)


@pytest.mark.parametrize("n, cfg", [
    (40, {"batch_size": 4, "grad_accum": 2, "epochs": 2, "eval_every": 3}),     # 10 steps: 3, 6, 9 + end
    (40, {"batch_size": 4, "grad_accum": 2, "epochs": 2, "eval_every": 5}),     # 10 steps: 5, 10 (end is one)
    (37, {"batch_size": 4, "grad_accum": 3, "epochs": 1, "eval_every": 2}),     # short last group: 4 steps
    (40, {"batch_size": 4, "grad_accum": 1, "max_steps": 7, "eval_every": 4}),  # max_steps wins over epochs
    (40, {"batch_size": 8, "grad_accum": 1, "epochs": 2, "eval_every": None}),  # only the end
])
def test_evaluation_passes_are_what_the_trainer_does(tmp_path, tok, n, cfg):
    """The plan counts as many passes over the validation rows as lmsys.train makes (a real run)."""
    from lmsys.models import build_model
    from lmsys.train import TrainSet, ValSet, train_classifier
    from train_worker import SPEC, make_task, settings
    ids, y = make_task(n, len(tok), seed=0)
    vids, vy = make_task(6, len(tok), seed=1)
    metrics = train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id), out_dir=tmp_path,
                               settings=settings(**cfg), val=ValSet(vids, vy))
    assert metrics["steps"] == token_model.optimizer_steps(n, cfg)
    assert len(metrics["evals"]) == token_model.evaluation_passes(n, cfg)


def test_teacher_evaluations_priced_as_configured():
    """Every 400 steps on the full profile's teacher (11 passes over the held-out fold, issue 19), or
    once at the end with eval_every null (the full profile)."""
    n_fold = 2 * (57477 * 4 / 5 + 21187)
    every_400 = {"batch_size": 4, "grad_accum": 16, "epochs": 2, "eval_every": 400}
    assert token_model.evaluation_passes(round(n_fold), every_400) == 11
    e = estimate(load_config("full"), 8)
    teacher = next(t for t in e["tasks"] if t.step == "train-teacher")
    evals = next(p for p in teacher.passes if p.what == "evaluate")
    assert evals.rows == pytest.approx(57477 / 5)                   # one pass over the fold's validation rows
    distill = next(t for t in e["tasks"] if t.step == "distill")
    assert next(p for p in distill.passes if p.what == "evaluate").rows == pytest.approx(11 * 57477 / 5)


# ---------------------------------------------------------------- scheduling

def test_list_scheduling_follows_priorities_dependencies_and_widths():
    """Three GPUs. a (2 GPUs, 10 s) and d (1 GPU, 20 s) start at once (d has the longest path, then a);
    b (1 GPU) waits for GPUs; at 10 s a ends and both b and c (3 GPUs, after a) are ready: b first by its
    longer path, so c, which needs all three, waits until d and b end at 20 s."""
    jobs = [schedule.Job("a", 10, 2), schedule.Job("b", 10, 1), schedule.Job("c", 5, 3), schedule.Job("d", 20, 1)]
    deps = {"c": ["a"]}
    placed = schedule.list_schedule(jobs, deps, gpus=3)
    assert placed == {"a": (0, 10), "d": (0, 20), "b": (10, 20), "c": (20, 25)}
    assert schedule.critical_path(jobs, deps) == (["d"], 20)
    assert schedule.list_schedule(jobs, deps, gpus=6)["c"] == (10, 15)       # enough GPUs: only the graph orders
    cpu = schedule.list_schedule([schedule.Job("x", 5, 0), schedule.Job("y", 5, 0), schedule.Job("g", 5, 1)], {}, 1, 1)
    assert sorted(cpu.values()) == [(0, 5), (0, 5), (5, 10)]                 # one CPU slot beside the GPU
    with pytest.raises(ValueError, match="needs 3 GPUs, the schedule has 2"):
        schedule.list_schedule(jobs, deps, gpus=2)
    with pytest.raises(ValueError, match="cycle"):
        schedule.list_schedule(jobs, {"a": ["c"], "c": ["a"]}, gpus=3)


def test_device_groups_and_the_pool_keep_wide_groups_whole():
    """One machine's worker groups (the local-gpus runner): every device alone and the aligned groups of
    each wider width; a narrow task goes inside a group already broken into, so a whole aligned group
    stays free for a wide one; no device is ever held twice."""
    groups = schedule.device_groups(["0", "1", "2", "3", "4", "5"], [1, 4, 2, 8])
    assert groups == [("0",), ("1",), ("2",), ("3",), ("4",), ("5",), ("0", "1"), ("2", "3"), ("4", "5"),
                      ("0", "1", "2", "3")]                      # width 8 > 6 devices: none; 4: only 0-3
    pool = schedule.DevicePool(groups)
    assert pool.take(1) == ("0",) and pool.take(1) == ("1",)     # the pair 0+1 is broken: fill it first
    assert pool.take(4) is None                                   # 0-3 has busy devices
    assert pool.take(2) == ("2", "3") and pool.busy == {"0", "1", "2", "3"}   # inside the broken 0-3: 4+5 stays whole
    pool.release(("0",))
    assert pool.take(1) == ("0",) and pool.take(1) == ("4",) and pool.take(1) == ("5",) and pool.take(1) is None


def test_list_scheduling_on_device_groups_waits_for_an_aligned_group():
    """Three devices, whose only pair is 0+1: b (30 s) takes device 0, a (10 s) device 1. When a ends,
    devices 1 and 2 are free: a 2-GPU job fits the pool (SLURM hands out any two) but not the machine's
    one pair, which has b on it: c waits for b."""
    jobs = [schedule.Job("a", 10, 1), schedule.Job("b", 30, 1), schedule.Job("c", 5, 2)]
    deps = {"c": ["a"]}
    assert schedule.list_schedule(jobs, deps, gpus=3)["c"] == (10, 15)
    groups = schedule.device_groups(["0", "1", "2"], [1, 2])
    assert groups == [("0",), ("1",), ("2",), ("0", "1")]
    assert schedule.list_schedule(jobs, deps, gpus=3, groups=groups) == {"b": (0, 30), "a": (0, 10), "c": (30, 35)}
    with pytest.raises(ValueError, match="no device group of width 2"):
        schedule.list_schedule(jobs, deps, gpus=3, groups=schedule.device_groups(["0", "1", "2"], [1]))


def test_plan_on_the_local_gpu_runner(capsys):
    """`lmsys plan --runner local-gpus`: the full profile on one machine of 8 GPUs schedules on the runner's
    worker groups, with no SLURM job, walltime or segment; the same totals as the cluster plan here (its
    widths 1, 4, 8 fall on aligned groups). Without a GPU, `auto` has no device: one error line."""
    cfg = load_config("full", {"orchestration.runner": "local-gpus"})
    e = estimate(cfg, 8)
    assert e["groups"] == schedule.device_groups([str(i) for i in range(8)], [1, 4, 8])
    assert all(t.segments == 1 and t.job["walltime"] is None and not t.resources for t in e["tasks"])
    by = {t.task: t for t in e["tasks"]}
    for t in e["tasks"]:
        held = sum(u.width for u in e["tasks"] if u.start <= t.start < u.end)
        assert held <= 8 and all(by[d].end <= t.start + 1e-6 for d in graph(cfg)[t.task]), t.task
    cluster = estimate(load_config("full"), 8)
    assert e["gpu_hours"] == pytest.approx(cluster["gpu_hours"]) and e["wall_s"] <= 10.5 * 86400
    assert main(["plan", "--profile", "full", "--gpus", "8", "--runner", "local-gpus"]) == 0
    out = capsys.readouterr().out
    assert "runner local-gpus: GPU workers on device groups 0, 1, 2, 3, 4, 5, 6, 7, 0+1+2+3, 4+5+6+7, 0+1+2+3+4+5+6+7" in out
    assert "local worker gpus=4" in out and "gres=" not in out and "!walltime" not in out
    assert main(["plan", "--profile", "tiny", "--runner", "local-gpus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: params.yaml orchestration.local_gpus: the local-gpus runner has no GPU") and \
        len(err.strip().splitlines()) == 1


def test_full_plan_respects_the_graph_and_the_gpus():
    """On 8 GPUs: no task starts before the tasks it reads from end; at no time are more than 8 GPUs
    held; GPU-hours = sum of width x wall; the wall time is the schedule's last end."""
    cfg = load_config("full")
    e = estimate(cfg, 8)
    by = {t.task: t for t in e["tasks"]}
    for name, before in graph(cfg).items():
        assert all(by[d].end <= by[name].start + 1e-6 for d in before), name
    for t in e["tasks"]:
        held = sum(u.width for u in e["tasks"] if u.start <= t.start < u.end)
        assert held <= 8, t.task
    assert e["gpu_hours"] == pytest.approx(sum(t.width * t.seconds / 3600 for t in e["tasks"]))
    assert e["wall_s"] == max(t.end for t in e["tasks"])
    assert e["wall_s"] >= e["critical_path_s"] and e["wall_s"] >= e["gpu_hours"] * 3600 / 8


def test_data_parallel_wall_and_gpu_hours():
    """A step of width w: wall = load + one-GPU work / (w x dp_efficiency); GPU-hours = w x wall."""
    cfg = load_config("full", {"orchestration.step_gpus": {"train-teacher": 8}})
    one = {t.task: t for t in estimate(load_config("full", {"orchestration.step_gpus": {}}), 8)["tasks"]}
    t = next(t for t in estimate(cfg, 8)["tasks"] if t.task == "train-teacher-fold0-modelllama")
    load = model_rates(cfg, "llama").load_s
    assert t.width == 8 and t.job["gpus"] == 8 and t.segments == 1
    assert t.seconds == pytest.approx(load + (t.one_gpu_s - load) / (8 * 0.9))
    assert t.gpu_hours == pytest.approx(8 * t.seconds / 3600)
    assert one[t.task].width == 1 and one[t.task].one_gpu_s == pytest.approx(t.one_gpu_s)
    cut = estimate(cfg, 2)                                                   # wider than the plan's GPUs: cut
    assert {t.width for t in cut["tasks"] if t.step == "train-teacher"} == {2} and cut["widths_cut"]["train-teacher"] == 8


# ---------------------------------------------------------------- jobs: walltime, segments, resources

def test_a_step_longer_than_the_partition_walltime_becomes_resumable_segments(capsys):
    """With 1-day jobs and one GPU a task, a teacher (days) runs as requeued segments, each paying the
    model load and half a checkpoint interval again, shown in the plan instead of !walltime; a step that
    cannot resume (quantize) over the limit is flagged."""
    over = {"orchestration.slurm.walltime": "1-00:00:00", "orchestration.step_gpus": {},
            "orchestration.estimate.step_s": {"ensemble": 600, "quantize": 90000}}
    cfg = load_config("full", over)
    t = next(t for t in estimate(cfg, 8)["tasks"] if t.task == "train-teacher-fold0-modelqwen")
    qwen = model_rates(cfg, "qwen")
    train = t.passes[0]
    restart = qwen.load_s + 0.5 * 4 * 16 * 50 * train.tokens / qwen.train          # checkpoint_every 50 steps of 64 rows
    n, total = schedule.segments(t.one_gpu_s, 86400 / 1.25, restart)
    assert (t.segments, t.seconds) == (n, pytest.approx(total)) and n > 5 and "!walltime" not in t.flags
    assert walltime_s(t.job["walltime"]) <= 86400
    assert main(["plan", "--profile", "full", "--gpus", "8", *sum((["--set", f"{k}={v}"] for k, v in over.items()), [])]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "train-teacher-fold0-modelqwen" in x)
    assert f"{n} jobs (requeued)" in line and "!walltime" not in line
    assert "!walltime" in next(x for x in out.splitlines() if " quantize " in x)
    assert schedule.segments(10, 20, 5) == (1, 10)
    assert schedule.segments(50, 20, 5) == (3, 60)                   # 20 + (5 + 15) + (5 + 15)
    assert schedule.segments(51, 20, 5) == (4, 66)                   # one second more: a fourth job
    with pytest.raises(ValueError):
        schedule.segments(50, 20, 20)


def test_each_step_asks_for_the_walltime_its_estimate_needs():
    e = estimate(load_config("full"), 8)
    for t in e["tasks"]:
        want = min(walltime_s(job_template(load_config("full"), t.gpu)["walltime"]),
                   3600 * math.ceil(1.25 * t.seconds / t.segments / 3600))
        assert walltime_s(t.job["walltime"]) == want, t.task
    assert walltime_text(90000) == "1-01:00:00" and walltime_text(59) == "00:01:00"


def test_host_memory_of_a_job_counts_every_rank(capsys):
    """A job of 8 ranks each loading a 70B nf4 model needs 8 x (process + weight shard + token lists):
    within the full profile's 128 GB; flagged !memory with the arithmetic in a 64 GB job."""
    e = estimate(load_config("full"), 8)
    assert not any("!memory" in t.flags or "!disk" in t.flags for t in e["tasks"])
    assert main(["plan", "--profile", "full", "--gpus", "8", "--set", "orchestration.slurm.memory=64GB"]) == 0
    out = capsys.readouterr().out
    assert "!memory" in next(x for x in out.splitlines() if " distill-fold0 " in x)
    line = next(x for x in out.splitlines() if x.startswith("job resources, distill"))
    assert re.search(r"host 8 x \(6 GB process \+ 5.0 GB weight shard \+ [\d,]+ M tokens x 36 B = [\d.]+ GB token lists\) "
                     r"= \d+ GB of 64GB", line), line


# ---------------------------------------------------------------- cards and the acceptance figures

def test_card_rescales_every_figure_by_the_stated_ratio(capsys):
    cfg = load_config("full", {"infer.packed": True})       # one inference path on both cards (see below)
    h200, a100 = estimate(cfg, 8), estimate(cfg, 8, "a100-80g")
    ratio = 251 / 797
    for model in ("llama", "qwen", "gemma"):
        a, h = model_rates(cfg, model, "a100-80g"), model_rates(cfg, model)
        assert (a.train, a.infer, a.evaluate) == pytest.approx((h.train * ratio, h.infer * ratio, h.evaluate * ratio))
    for t, u in zip(h200["tasks"], a100["tasks"]):           # every pass's seconds / ratio; loads stay
        assert sum(p.seconds for p in u.passes) == pytest.approx(sum(p.seconds for p in t.passes) / ratio), t.task
    assert a100["gpu_hours"] > 2.5 * h200["gpu_hours"]
    assert main(["plan", "--profile", "full", "--gpus", "8", "--card", "a100-80g"]) == 0
    out = capsys.readouterr().out
    assert "card a100-80g: derived: its 312 TFLOP/s dense bf16 spec x 797 / 989" in out
    assert "x 251/797 (a100-80g/h200 bf16)" in out
    assert main(["plan", "--profile", "full", "--card", "v100"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_full_profile_on_8_h200s_meets_the_issue_19_targets(capsys):
    """Issue 19's acceptance: <= 1,900 GPU-hours and <= 10.5 days on 8 GPUs (H200 figures, data-parallel
    efficiency 0.9), no !walltime, every task once with its job, every figure with a measured/derived source."""
    cfg = load_config("full")
    assert main(["plan", "--profile", "full", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    total = re.search(r"total: ([\d.]+) GPU-hours .* list schedule: [\d.]+ d \(([\d.]+) days\)", out)
    assert float(total.group(1)) <= 1900 and float(total.group(2)) <= 10.5, total.group(0)
    assert "!walltime" not in out and "!timeout" not in out and "!memory" not in out
    tasks = {task_label(n, k): n for n, k in tasks_of(cfg)}
    lines = {x.split()[2]: x for x in out.splitlines() if re.match(r"\s*[\d.]+ (s|min|h|d)\s+\S+\s+(gpu|cpu) ", x)}
    assert sorted(lines) == sorted(tasks) and len(tasks) >= 40
    for task, step in tasks.items():
        width = cfg["orchestration"]["step_gpus"].get(step, 1)
        want = f"gpu gres=gpu:{width} mem=1000GB cores=64 wall=" if STEPS[step].gpu else "cpu cpu mem=32GB cores=4 wall="
        assert want in lines[task], lines[task]
    sources = re.findall(r"(?m)^  (?:  source: |card h200: |factor \S+ [\d.]+: |tokens \S+: .* at \d+ \()(\w+)", out)
    assert len(sources) == 1 + 3 + 3 + 4 and set(sources) == {"measured", "derived"}, sources   # card, tokens, models, factors
    assert "data parallel: post-pretrain 4, post-pretrain-student 8" in out and "efficiency 0.9" in out
    assert "critical path (longest chain of dependent tasks" in out and "GPU-hours by step: train-teacher" in out


def test_the_plan_prices_the_inference_path_the_code_takes(capsys):
    """Issue 19 item 4: the plan reads the real switch (`infer`, lmsys.infer.route) and the card's compute
    capability: packed on the H200 (9.0, verified), padded on an A100 (8.0, not verified) and everywhere
    with infer.packed false; the CPU card (tiny) has no capability: padded, as the code runs there."""
    cfg = load_config("full")
    padded = load_config("full", {"infer.packed": False})
    for model in ("llama", "gemma"):
        assert model_rates(cfg, model).infer == pytest.approx(model_rates(padded, model).infer * 25174 / 18265)
        assert model_rates(cfg, model, "a100-80g").infer == pytest.approx(model_rates(padded, model).infer * 251 / 797)
    assert main(["plan", "--profile", "full", "--gpus", "8"]) == 0
    assert "inference path: packed (infer.packed auto: card h200's capability 9.0 is verified" in capsys.readouterr().out
    assert main(["plan", "--profile", "full", "--gpus", "8", "--card", "a100-80g"]) == 0
    assert ("inference path: padded (infer.packed auto: card a100-80g's capability 8.0 is not in "
            "infer.verified_capabilities ['9.0']") in capsys.readouterr().out
    assert main(["plan", "--profile", "tiny"]) == 0
    assert "inference path: padded (infer.packed auto: card cpu has no CUDA capability" in capsys.readouterr().out


def test_main_at_d5c1397_repriced_is_far_over_the_targets():
    """The same token model with the levers off (padded micro-batches, teacher evaluations every 400
    steps, one GPU a task, padded fp32-cast nf4 inference): what today's code costs."""
    today = {"trainer.packing": False, "train_teacher.eval_every": 400, "orchestration.step_gpus": {},
             "infer.packed": False, "orchestration.estimate.code": {"nf4_inference_bf16": False}}
    e = estimate(load_config("full", today), 8)
    assert e["gpu_hours"] > 2500 and e["wall_s"] / 86400 > 20
    teacher = next(t for t in e["tasks"] if t.step == "train-teacher")
    assert teacher.passes[0].tokens == pytest.approx(909, abs=10)          # computed tokens a row, padded


# ---------------------------------------------------------------- serving (issue 20)

def test_serving_estimate_arithmetic_on_two_t4s(capsys):
    """25,000 rows on 2 x T4: each T4 one TTA order; rate = the H200's padded-path tokens/s x T4 fp16 /
    H200 bf16 sustained; the batch is what 14.7 GiB leaves after the GPTQ weights (embedding in fp16)."""
    cfg = load_config("full")
    s = serving_estimate(cfg, 25000, "2xT4")
    weights = 8.32e9 * (1 + 3 / 128) + 0.9175e9 * 2
    assert s["weights"] == pytest.approx(weights)
    per_row = row_bytes({"hidden": 3584, "intermediate": 14336, "heads": 16}, 2000)
    assert per_row == 2000 * (3584 * 8 + 14336 * 6) + 16 * 2000**2 * 6
    fits = math.floor((14.7 * 2**30 - weights - 0.5 * 2**30) / per_row)
    assert (s["fits"], s["batch"]) == (fits, min(8, fits))
    rate = 18265 * 24 / 797
    tokens = token_model.mean_tokens(RECIPE_LENGTHS, 2000)
    dequant = 8.32e9 * (1 + 3 / 128) * 5 / 320e9
    assert s["seconds"] == pytest.approx(25000 * tokens / rate + math.ceil(25000 / s["batch"]) * dequant + 300)
    one = serving_estimate(cfg, 25000, "1xT4")                       # both orders on one card: over 9 h
    assert one["seconds"] > one["limit_s"] > s["seconds"]
    assert main(["plan", "--profile", "full", "--gpus", "8", "--test-rows", "25000", "--serve-cards", "2xT4"]) == 0
    out = capsys.readouterr().out
    assert "serving estimate, unmeasured (derived; no t4 measured): predict 25,000 test rows on 2 x t4" in out
    assert "TTA: the original order on t4 #1, the swapped on t4 #2" in out and "x 24 / 797" in out
    assert re.search(r"predict on 2 x t4: [\d.]+ h of the 9 h limit\n", out + "\n")
    assert main(["plan", "--profile", "full", "--test-rows", "25000", "--serve-cards", "1xT4"]) == 0
    assert "!over the limit" in capsys.readouterr().out
    assert main(["plan", "--profile", "tiny", "--serve-cards", "2xT4"]) == 2            # no T4 figures there
    err = capsys.readouterr().err
    assert err == "error: params.yaml orchestration.estimate: cards.t4: no sustained fp16 figure (cards with one: [])\n"
    assert parse_cards(" 2 x T4 ", "--serve-cards") == (2, "T4") and parse_cards("t4") == (1, "T4")
    with pytest.raises(ValueError, match="--serve-cards 'two T4': expected N x CARD"):
        parse_cards("two T4", "--serve-cards")


# ---------------------------------------------------------------- job templates, errors, other profiles

def test_job_templates_and_timeouts():
    tiny, full = load_config("tiny"), load_config("full")
    assert job_template(tiny, gpu=False) == {**job_template(tiny, gpu=True), "gpus": 0}   # null -> the GPU template
    assert job_template(full, gpu=False) == {"queue": "cpu", "walltime": "12:00:00", "memory": "32GB", "cores": 4, "gpus": 0}
    assert step_timeout(full, "train-teacher") == 1152000 and step_timeout(tiny, "train-teacher") == 7200
    assert walltime_s("7-00:00:00") == 7 * 86400 and walltime_s("02:00:00") == 7200
    with pytest.raises(ValueError):
        walltime_s("2h")


def test_plan_errors_are_one_line(capsys):
    assert main(["plan", "--profile", "tiny", "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_full_profile_slurm_job_scripts_gpu_and_cpu_templates():
    """The sbatch scripts dask-jobqueue writes for the full profile: the GPU job is a node on the GPU
    template with --gres=gpu:8 and the worker resource GPU=8 (its steps side by side, each holding its
    width of it); the CPU-only job on the CPU template (partition, memory,
    cores, walltime), no --gres, offering the CPU_JOB resource that CPU steps ask for."""
    from dask_jobqueue.slurm import SLURMJob

    from flows.runners import cpu_job_template, slurm_cluster_kwargs
    from flows.slurm_cpu import cpu_job_options
    cfg = load_config("full")
    kw = {k: v for k, v in slurm_cluster_kwargs(cfg).items()
          if k not in ("log_directory", "scheduler_options", "interface")}
    gpu = SLURMJob(scheduler="tcp://127.0.0.1:8786", name="gpu-0", **kw).job_script()
    cpu = SLURMJob(scheduler="tcp://127.0.0.1:8786", name="cpu-0", **cpu_job_options(kw, cpu_job_template(cfg))).job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:8", "#SBATCH -t 7-00:00:00", "#SBATCH --cpus-per-task=64"):
        assert line in gpu, gpu
    assert "--resources GPU=8" in gpu and "CPU_JOB" not in gpu
    for line in ("#SBATCH -p cpu", "#SBATCH -t 12:00:00", "#SBATCH --cpus-per-task=4"):
        assert line in cpu, cpu
    assert "--gres" not in cpu and "GPU=1" not in cpu and "--resources CPU_JOB=1" in cpu
    assert re.search(r"#SBATCH --mem=(29|30|32)G", cpu) and re.search(r"#SBATCH --mem=(93[0-9]|1000)G", gpu)


def test_models_without_figures_are_shown_unknown_not_fatal(capsys):
    """The small profile's models have no figures in orchestration.estimate: their tasks print '?' and
    are left out of the totals, which the output says."""
    assert main(["plan", "--profile", "small"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "train-teacher-fold0-modelgemma3" in x)
    assert " ? " in line
    assert "no throughput figures in orchestration.estimate.models for" in out and "left out of the totals" in out


# ---------------------------------------------------------------- the recipe table and its graph

def test_lmsys_steps_prints_the_numbered_recipe_in_order(capsys):
    from lmsys.steps.recipe import RECIPE
    assert main(["steps"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert [n for n, _ in rows] == ["D1", "D2", "D3", "1", "1", "2", "2.5", "2.5", "3", "4", "4.5", "5", "6", "7",
                                    "8", "8.5", "9"]
    assert [s for _, s in rows] == [s.name for s in RECIPE for _ in (s.number, *s.also)]
    assert dict(rows)["8.5"] == "predict"                     # TTA is carried out by the predict step


def test_the_flow_the_dvc_stages_and_the_cli_read_one_table():
    from lmsys.cli import build_parser
    from stages.lineage import dvc_stages
    cfg = load_config()
    assert list(dvc_stages()) == list(dict.fromkeys(n for n, _ in tasks_of(cfg)))       # the table's order
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(STEPS) <= set(sub.choices)


def test_each_task_waits_only_for_the_tasks_that_write_its_inputs():
    cfg = load_config("tiny")
    deps = graph(cfg)
    assert set(deps) == {task_label(n, k) for n, k in tasks_of(cfg)}
    # a fold's teacher logits wait for that fold's teacher only, not the other folds' or teachers'
    assert [d for d in deps["teacher-logits-fold0-modelllama"] if d.startswith("train-teacher")] == \
        ["train-teacher-fold0-modelllama"]
    assert sorted(d for d in deps["distill-fold1"] if d.startswith(("filter-argmax", "calibrate"))) == \
        ["calibrate-modelllama", "calibrate-modelqwen", "filter-argmax-fold1"]
    over = load_config("tiny", {"calibrate.enabled": False})
    assert [d for d in graph(over)["distill-fold1"] if d.startswith("teacher-logits")] == \
        ["teacher-logits-fold1-modelllama", "teacher-logits-fold1-modelqwen"]   # without step 4.5: its own fold's
    order = [task_label(n, k) for n, k in tasks_of(cfg)]
    assert order[0] == "demo-data"
    for i, t in enumerate(order):              # the table's order is a topological order of the graph
        assert set(deps[t]) <= set(order[:i]), t
