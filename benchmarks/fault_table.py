"""The fault table (issue 22): every case of the issue and of the earlier probes, run for real, and
the table in benchmarks/RESULTS.md (between <!-- faults:table --> and <!-- /faults:table -->)
regenerated from what happened: exit code, the message, whether anything was lost, and which
resumable work directories a stop leaves on purpose.

    nice -n 10 python benchmarks/fault_table.py [--only NAME ...] [--list] [--keep DIR]

Every case is one `Case` in CASES: a name, the finding or probe it comes from, what the user did,
`run(ctx) -> Outcome` (set up in its own directory, run the real `lmsys` commands as
subprocesses), the exit code it must end with and a pattern its one `error:` (or warning) line
must match. To add a case (e.g. issue 21's parameter validation: `--set distill.lr=abc`), append
one. A case passes when the exit code is the documented one, the message matches, nothing was lost
(the case's own check: rows accounted for, no output half-written or published, the previous set
whole) and no process of the run is left.

The run-level cases use a Prefect server this script starts (its own PREFECT_HOME, a free port,
through flows.server.ensure) and the orchestration tests' small configuration with two local
worker processes. "kill at each long step" SIGKILLs one run per long step on one root, each run
resuming what the killed one left, then lets a last run finish and checks its submission.
Full disk: a 64 KiB / 2 MiB tmpfs; read-only root: a tmpfs mounted read-only (both need root: the
cases say "skipped" with the reason otherwise). Writes benchmarks/results/fault_table.json too.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for k, v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}.items():
    os.environ.setdefault(k, v)

RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
RESULTS_JSON = REPO / "benchmarks" / "results" / "fault_table.json"
MARK = ("<!-- faults:table -->", "<!-- /faults:table -->")
# tests/orchestration/orch_config.SMALL with two local workers: every step in well under a minute
SMALL = {"folds.n_folds": 2, "models.teachers": ["llama"], "demo.rows": 200, "demo.test_rows": 40,
         "demo.external_rows": 40, "demo.ut_rows": 60, "train_teacher.epochs": 1, "distill.epochs": 1,
         "distill.max_steps": 8, "text.train_max_length": 128, "text.infer_max_length": 128, "text.prompt_tokens": 32,
         "orchestration.local_workers": 2}
LONG_STEPS = ("post-pretrain", "filter-score", "train-teacher", "teacher-logits", "distill", "ensemble", "predict")
WORKERS_GONE_S = 5.0
TEST_COLUMNS = ["id", "prompt", "response_a", "response_b"]


@dataclass
class Outcome:
    exit: int | None
    message: str                          # the command's error line (or its warning / result line)
    lost: str = "nothing"                 # what a user lost, or "nothing" (with the check that says so)
    left: str = "-"                       # resumable work dirs left on purpose
    ok_lost: bool = True
    skipped: str = ""                     # why the case could not run here
    seconds: float = 0.0


@dataclass
class Case:
    name: str
    source: str                           # the finding or probe
    what: str
    run: Callable[["Ctx"], Outcome]
    exit: int
    expect: str                           # regex the message must match
    notes: str = ""


@dataclass
class Ctx:
    base: Path
    demo: Path
    model: Path
    api: str
    dirs: dict = field(default_factory=dict)

    def dir(self, name: str) -> Path:
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        return d


# ---------------------------------------------------------------- running commands


def default_sigint() -> None:
    """preexec_fn of a command the test stops with Ctrl-C: SIGINT back to its default, as a terminal has it.
    A shell starts background jobs with SIGINT ignored, their children inherit that, and Python then keeps
    it ignored (so does lmsys: a run started under nohup is not stopped by a stray Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmsys.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def said(r: subprocess.CompletedProcess) -> str:
    """The line a user reads: the `error:` line (the last one), else the last warning, else stdout's last."""
    err = [x for x in r.stderr.splitlines() if x.strip()]
    for prefix in ("error:", "warning:"):
        lines = [x for x in err if x.startswith(prefix)]
        if lines:
            return lines[-1] + (" [+ traceback]" if "Traceback" in r.stderr else "")
    out = [x for x in r.stdout.splitlines() if x.strip()]
    return (out or err or [""])[-1]


def outcome(r: subprocess.CompletedProcess, lost: str = "nothing", ok: bool = True, left: str = "-") -> Outcome:
    return Outcome(r.returncode, said(r), lost, left, ok)


def sets(over: dict) -> list[str]:
    return [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def data_sets(ctx: Ctx, **over) -> list[str]:
    d = ctx.demo
    return sets({"data.train": str(d / "train.csv"), "data.test": str(d / "test.csv"),
                 "data.external": [str(d / "external_33k.jsonl")], "data.ut": str(d / "ut.parquet"), **over})


def absent(*paths: Path) -> tuple[str, bool]:
    left = [str(p) for p in paths if p.exists()]
    return ("nothing written" if not left else f"written: {', '.join(left)}"), not left


def write_rows(path: Path, rows: list[dict], columns) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A tmpfs mounted at `where` for the block (root only: raises PermissionError otherwise)."""
    if os.geteuid() != 0:
        raise PermissionError("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# ---------------------------------------------------------------- bad input (findings 4, 5, 7, 8, 9, 10)

def _openbmb(instruction="Name a colour.", completions="default") -> dict:
    comp = lambda m, r, s: {"model": m, "response": r, "overall_score": s}  # noqa: E731
    return {"instruction": instruction,
            "completions": [comp("m1", "red", 8.0), comp("m2", "blue", 6.5)] if completions == "default" else completions}


def _convert(ctx: Ctx, name: str, rows: list[dict], out: str = "ut.parquet") -> Outcome:
    d = ctx.dir(name)
    (d / "raw.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = cli("convert-ut", d / "raw.jsonl", "--out", d / out)
    if not (d / out).exists():
        return outcome(r, *absent(d / out))
    from lmsys.data.validate import validate_file
    n = len(validate_file(d / out, source="ultrafeedback").clean)
    skipped = sum(int(x) for x in re.findall(r": (\d+) \(first rows", r.stderr))
    pairs = sum(len(rw["completions"]) // 2 if isinstance(rw.get("completions"), list) else 1 for rw in rows)
    ok = n + skipped == pairs if "instruction" in rows[0] else n + skipped == len(rows)
    return outcome(r, f"{n} battles + {skipped} skipped = {n + skipped} of {pairs if 'instruction' in rows[0] else len(rows)} "
                      "(read back by the project's reader)", ok)


def case_convert_null_completions(ctx):
    return _convert(ctx, "convert-null", [_openbmb(), _openbmb("q", completions=None)])


def case_convert_chosen(value):
    def run(ctx):
        msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
        good = {"prompt": "a?", "chosen": msgs("a?", "yes"), "rejected": msgs("a?", "no"), "score_chosen": 9,
                "score_rejected": 2}
        return _convert(ctx, f"convert-chosen-{value}", [good, {**good, "prompt": "b?", "chosen": value}])
    return run


def case_convert_annotations_list(ctx):
    comp = lambda r, x: {"model": "m", "response": r, "annotations": [{"Rating": v} for v in x]}  # noqa: E731
    return _convert(ctx, "convert-annotations", [_openbmb(completions=[comp("red", ["5", "4"]), comp("blue", ["2"])])])


def case_convert_identical(ctx):
    return _convert(ctx, "convert-identical", [_openbmb(), _openbmb()])


def case_out_suffix(name):
    def run(ctx):
        d = ctx.dir(f"suffix-{name}")
        r = cli("convert-ut", d / "missing.jsonl", "--out", d / name) if name.endswith(".txt") else None
        if r is not None:
            return outcome(r, *absent(d / name))
        o = _convert(ctx, f"suffix-{name}", [_openbmb()], out=name)
        head = (ctx.base / f"suffix-{name}" / name).read_bytes()[:4]
        kind = "gzip" if head[:2] == b"\x1f\x8b" else "parquet" if head == b"PAR1" else "text"
        o.lost += f"; file is {kind}"
        return o
    return run


def case_predict_out(kind):
    def run(ctx):
        d = ctx.dir(f"predict-out-{kind}")
        out = d if kind == "dir" else d / "sub.json"
        t0 = time.perf_counter()
        r = cli("predict", "--test", ctx.demo / "test.csv", "--model", ctx.model, "--out", out)
        o = outcome(r, f"refused in {time.perf_counter() - t0:.1f} s, before loading the model", r.returncode == 2)
        return o
    return run


def case_calibrate_apply_suffix(ctx):
    d = ctx.dir("calibrate-apply-suffix")
    r = cli("calibrate", "apply", "--preds", d / "p.csv", "--params-file", d / "c.json", "--out", d / "o.tsv")
    return outcome(r, *absent(d / "o.tsv"))


def _prepare_root(ctx: Ctx, name: str, *extra, **over) -> tuple[subprocess.CompletedProcess, Path]:
    root = ctx.dir(name) / "root"
    return cli("prepare", "--root", root, *data_sets(ctx, **over), *extra), root


def case_prepare_stale(ctx):
    import pandas as pd
    d = ctx.dir("prepare-stale")
    train = pd.read_csv(ctx.demo / "train.csv", dtype=str, keep_default_na=False)
    train.loc[0, "prompt"] = "[broken"
    train.to_csv(d / "bad.csv", index=False)
    r1, root = _prepare_root(ctx, "prepare-stale", **{"data.train": str(d / "bad.csv")})
    had = (root / "artifacts/tiny/prepared/quarantine_train_bad.csv").exists()
    r, root = _prepare_root(ctx, "prepare-stale")
    stale = (root / "artifacts/tiny/prepared/quarantine_train_bad.csv").exists()
    text = (f"first prepare wrote quarantine_train_bad.csv: {had}; after the clean prepare it is "
            f"{'still there' if stale else 'gone'}")
    return Outcome(r.returncode, text, "nothing: prepared/ is the new set, whole", "-", had and not stale and r1.returncode == 0)


def case_prepare_ctrl_c(ctx):
    import pandas as pd
    d = ctx.dir("prepare-ctrl-c")
    train = pd.read_csv(ctx.demo / "train.csv", dtype=str, keep_default_na=False)
    pd.concat([train.assign(id=train["id"] + f"{i:03d}") for i in range(150)]).to_csv(d / "big.csv", index=False)
    r0, root = _prepare_root(ctx, "prepare-ctrl-c")
    prepared = root / "artifacts/tiny/prepared"
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    p = subprocess.Popen([sys.executable, "-m", "lmsys.cli", "prepare", "--root", str(root),
                          *data_sets(ctx, **{"data.train": str(d / "big.csv")})], stderr=subprocess.PIPE, text=True, cwd=REPO,
                         preexec_fn=default_sigint)
    deadline = time.monotonic() + 60
    while not (root / "artifacts/.lease.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    after = {q.name: q.read_bytes() for q in prepared.iterdir()}
    staged = [q.name for q in prepared.parent.iterdir() if q.name.startswith(".prepared")]
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    return outcome(r, "prepared/ byte-identical to the previous set" if after == before and not staged
                   else f"prepared/ changed: {sorted(set(after) ^ set(before))}, staged leftovers {staged}",
                   after == before and not staged and r0.returncode == 0)


def case_odd_ids(ctx):
    d = ctx.dir("odd-ids")
    good = {"model_a": "a", "model_b": "b", "winner_model_a": "1", "winner_model_b": "0", "winner_tie": "0",
            "response_a": '["x"]', "response_b": '["y"]'}
    ids = ["123", "1000", "\u0661\u0662\u0663", "\uff11\uff12\uff13", "1_000", "+42"]
    from lmsys.data.schema import KAGGLE_TRAIN_COLUMNS
    write_rows(d / "t.csv", [{"id": i, "prompt": f'["p{n}"]', **good} for n, i in enumerate(ids)], KAGGLE_TRAIN_COLUMNS)
    r = cli("validate", d / "t.csv")
    ok = "bad_id: 4" in r.stdout and "duplicate_id" not in r.stdout
    return outcome(r, "123 and 1000 clean; the four look-alikes quarantined as bad_id, none a duplicate of a real id", ok)


def case_empty_test_id(ctx):
    import pandas as pd
    d = ctx.dir("empty-test-id")
    good = {"prompt": '["what is two plus two"]', "response_a": '["four"]', "response_b": '["it is 4"]'}
    rows = [{"id": str(100 + i), **good} for i in range(19)] + [{"id": "", **good}]
    write_rows(d / "test.csv", rows, TEST_COLUMNS)
    r = cli("predict", "--test", d / "test.csv", "--model", ctx.model, "--out", d / "sub.csv")
    sub = pd.read_csv(d / "sub.csv", dtype={"id": str}, keep_default_na=False) if (d / "sub.csv").exists() else None
    n = 0 if sub is None else len(sub)
    return outcome(r, f"{len(rows)} rows in, {n} out (the empty id answered as '')", n == len(rows))


def case_same_test_twice(ctx):
    t = str(ctx.demo / "test.csv")
    r, root = _prepare_root(ctx, "test-twice", **{"data.test": [t, t]})
    return outcome(r, *absent(root / "artifacts/tiny/prepared"))


def case_no_test(ctx):
    r, root = _prepare_root(ctx, "no-test", **{"data.test": None})
    return outcome(r, *absent(root / "artifacts/tiny/prepared"))


def case_test_none(ctx):
    r, root = _prepare_root(ctx, "test-none", **{"data.test": "none"})
    from lmsys.config import load_config
    from lmsys.steps.recipe import tasks_of
    steps = [n for n, _ in tasks_of(load_config("tiny", {"data.train": "x", "data.test": "none"}))]
    return Outcome(r.returncode, f"prepared without a test set; the plan has no predict step: {'predict' not in steps}",
                   "nothing", "-", "predict" not in steps)


def case_shared_ids(ctx):
    import pandas as pd
    d = ctx.dir("shared-ids")
    test = pd.read_csv(ctx.demo / "test.csv", dtype=str, keep_default_na=False)
    test.loc[:2, "id"] = pd.read_csv(ctx.demo / "train.csv", dtype=str)["id"][:3].to_numpy()
    test.to_csv(d / "test.csv", index=False)
    r, root = _prepare_root(ctx, "shared-ids", **{"data.test": str(d / "test.csv")})
    return outcome(r, *absent(root / "artifacts/tiny/prepared"))


def case_check_shared_ids(ctx):
    """The same, found by `lmsys check` (the flow's first task) before any training."""
    d = ctx.base / "shared-ids"
    r = cli("check", "--root", ctx.dir("check-shared") / "root", *data_sets(ctx, **{"data.test": str(d / "test.csv")}))
    line = next((x for x in r.stdout.splitlines() if x.startswith("FAIL")), said(r))
    return Outcome(r.returncode, re.sub(r"\s+", " ", line), "nothing written (the check writes nothing)")


def case_folds_same_external(ctx):
    d = ctx.dir("folds-external")
    r = cli("folds", ctx.demo / "train.csv", "--external", ctx.demo / "train.csv", "--n-folds", 2, "--out", d)
    return outcome(r, *absent(d / "folds.csv"))


def case_add_test_as_train(ctx):
    r = cli("data", "add", ctx.demo / "test.csv", "--as", "train", "--no-dvc", "--no-event")
    return outcome(r, *absent(REPO / "data" / "added" / "test.csv")) if r.returncode else outcome(r, "added", False)


def case_label_column(ctx):
    import pandas as pd
    from lmsys.data.schema import WINNER_COLUMNS
    d = ctx.dir("label-column")
    train = pd.read_csv(ctx.demo / "train.csv", dtype=str, keep_default_na=False)
    labels = train[WINNER_COLUMNS].astype(int).to_numpy().argmax(1)
    train.drop(columns=WINNER_COLUMNS).assign(label=labels).to_csv(d / "train.csv", index=False)
    r = cli("data", "add", d / "train.csv", "--no-dvc", "--no-event")
    return outcome(r, "not filed as test" if r.returncode == 2 else "filed", r.returncode == 2)


def _preds(path: Path, n: int, label=None) -> Path:
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(n, 3)), columns=["logit_a", "logit_b", "logit_tie"])
    df.insert(0, "id", range(n))
    df["label"] = rng.integers(0, 3, n) if label is None else label
    df.to_csv(path, index=False)
    return path


def case_calibrate(n, label):
    def run(ctx):
        d = ctx.dir(f"calibrate-{n}-{label}")
        r = cli("calibrate", "fit", "--preds", _preds(d / "p.csv", n, label), "--out", d / "c.json")
        p = json.loads((d / "c.json").read_text()) if (d / "c.json").exists() else {}
        ident = p.get("scale") == [1.0] * 3 and p.get("bias") == [0.0] * 3
        return outcome(r, f"identity written, flagged fallback: {p.get('fallback')}", ident and p.get("fallback") is True)
    return run


def case_zero_byte_labels(ctx):
    d = ctx.dir("zero-labels")
    (d / "labels.csv").write_bytes(b"")
    return outcome(cli("evaluate", "--preds", _preds(d / "p.csv", 10), "--labels", d / "labels.csv"))


def case_missing_model(ctx):
    d = ctx.dir("missing-model")
    r = cli("predict", "--test", ctx.demo / "test.csv", "--model", d / "nope", "--out", d / "s.csv")
    return outcome(r, *absent(d / "s.csv"))


def case_truncated_weights(ctx):
    d = ctx.dir("truncated")
    shutil.copytree(ctx.model, d / "model", dirs_exist_ok=True)
    w = d / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = cli("predict", "--test", ctx.demo / "test.csv", "--model", d / "model", "--out", d / "s.csv")
    return outcome(r, *absent(d / "s.csv"))


def case_run_params(ctx):
    return outcome(cli("run", "--params", ctx.base / "p.yaml", "--root", ctx.dir("run-params")))


def case_param(*args, params: str | None = None):
    """An `lmsys` command with a bad parameter (a --set, or a params file of `params` content): it must
    stop before any work with exit 2 naming the key; nothing written under its root."""
    def run(ctx):
        root = ctx.dir("param-" + re.sub(r"\W+", "-", " ".join(args) + (params or "")[:12]).strip("-"))
        extra = []
        if params is not None:
            p = root / "params.yaml"
            p.write_bytes(params.encode("latin-1") if params else b"")
            extra = ["--params", str(p)]
        r = cli(*args, *extra, "--root", root)
        written = [str(q.relative_to(root)) for q in root.rglob("*") if q.name != "params.yaml"]
        return outcome(r, lost="nothing" if not written else f"written: {written[:3]}", ok=not written)
    return run


def params_without(section: str) -> str:
    import yaml
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.pop(section)
    return yaml.safe_dump(raw)


def params_with(key: str, value) -> str:
    import yaml
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[key] = value
    return yaml.safe_dump(raw)


def case_utf16(ctx):
    d = ctx.dir("utf16")
    (d / "t.csv").write_bytes((ctx.demo / "test.csv").read_text(encoding="utf-8").encode("utf-16"))
    return outcome(cli("validate", d / "t.csv"))


def case_missing_file(ctx):
    return outcome(cli("validate", ctx.base / "nope.csv"))


def case_full_disk_out(ctx):
    try:
        with tmpfs(ctx.base / "full-out", "size=64k") as full:
            r = cli("validate", ctx.demo / "train.csv", "--out", full / "v")
            pub = [p.name for p in (full / "v").iterdir() if not p.name.startswith(".")] if (full / "v").exists() else []
            return outcome(r, f"published: {pub or 'nothing'}; what is there is whole (atomic writes)")
    except PermissionError as e:
        return Outcome(None, "", skipped=str(e))


def case_full_disk_root(ctx):
    try:
        with tmpfs(ctx.base / "full-root", "size=48k") as full:
            r = cli("prepare", "--root", full, *data_sets(ctx))
            pub = (full / "artifacts/tiny/prepared").exists()
            return outcome(r, "prepared/ not published (the staged set was removed)" if not pub else "prepared/ published!",
                           not pub)
    except PermissionError as e:
        return Outcome(None, "", skipped=str(e))


def case_read_only_root(command):
    def run(ctx):
        try:
            with tmpfs(ctx.base / f"ro-{command}", "ro,size=1m") as ro:
                if command == "check":
                    r = cli("check", "--root", ro)
                    line = next((x for x in r.stdout.splitlines() if "root: writable" in x), said(r))
                    return Outcome(r.returncode, re.sub(r"\s+", " ", line), "nothing written")
                return outcome(cli("prepare", "--root", ro, *data_sets(ctx)), "nothing written")
        except PermissionError as e:
            return Outcome(None, "", skipped=str(e))
    return run


# ---------------------------------------------------------------- run-level faults (findings 1, 2, 3)

def start_run(root: Path, log: Path, env: dict | None = None, over: dict | None = None) -> subprocess.Popen:
    """`lmsys run` in its own session; stderr to `log`, stdout to `log` + ".out"."""
    return subprocess.Popen([sys.executable, "-m", "lmsys.cli", "run", "--root", str(root), *sets({**SMALL, **(over or {})})],
                            stdout=open(f"{log}.out", "w"), stderr=open(log, "w"), env=env, cwd=REPO, start_new_session=True,
                            preexec_fn=default_sigint)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_task(root: Path, run: subprocess.Popen, prefix: str = "", timeout: float = 600,
                  every: float = 0.1) -> tuple[set[int], str]:
    """(worker pids, task label) once a worker runs a task whose label starts with `prefix`."""
    running = root / "artifacts" / "tiny" / ".running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        for f in sorted(running.glob("*.json")) if running.exists() else []:
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if rec["pid"] != run.pid and rec["task"].startswith(prefix):
                kids = subprocess.run(["pgrep", "-P", str(run.pid), "-f", "multiprocessing.spawn"],
                                      capture_output=True, text=True).stdout.split()
                return {int(k) for k in kids} | {rec["pid"]}, rec["task"]
        time.sleep(every)
    return set(), ""


def wait_exit(p: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return None, timeout
    return p.returncode, time.monotonic() - t0


def left_after(pids: set[int], within: float = WORKERS_GONE_S) -> list[int]:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


def api(url: str, path: str, body: dict | None = None):
    import urllib.request
    req = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def flow_runs(url: str, root: Path) -> list[dict]:
    runs = api(url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 200})
    return [r for r in runs if (r.get("parameters") or {}).get("root") == str(root)]


def running_task_runs(url: str, run_id: str) -> list[str]:
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return [t["name"] for t in tasks if t["state"]["type"] in ("RUNNING", "PENDING")]


def final_state(url: str, run_id: str, settle_s: float = 10) -> str:
    deadline = time.monotonic() + settle_s
    while True:
        s = api(url, f"/flow_runs/{run_id}")["state"]["type"]
        if s not in ("RUNNING", "PENDING") or time.monotonic() > deadline:
            return s
        time.sleep(0.5)


def work_dirs(root: Path) -> str:
    """The resumable work a stop leaves on purpose: training `.partial` dirs (checkpoints) and
    inference shards; and temp files of atomic writes (never published, replaced by the next write)."""
    art = root / "artifacts" / "tiny"
    partial = sorted(str(p.relative_to(art)) for p in art.rglob("*.partial") if p.is_dir())
    shards = sorted(f"{p.relative_to(art)} ({len(list(p.glob('*')))} shards)" for p in art.rglob(".*.shards") if p.is_dir())
    temp = sorted(str(p.relative_to(art)) for p in art.rglob(".*.tmp"))
    return "; ".join(filter(None, [", ".join(partial), ", ".join(shards), f"temp: {', '.join(temp)}" if temp else ""])) or "none"


def stop_case(sig: int, group: bool, name: str):
    def run(ctx):
        root, log = ctx.dir(name) / "root", ctx.dir(name) / "run.log"
        p = start_run(root, log)
        workers, task = wait_for_task(root, p, "train-teacher")
        (os.killpg if group else os.kill)(p.pid, sig)
        rc, took = wait_exit(p, 60)
        left = left_after(workers)
        runs = flow_runs(ctx.api, root)
        state = final_state(ctx.api, runs[0]["id"]) if runs else "none"
        tasks = running_task_runs(ctx.api, runs[0]["id"]) if runs else []
        r = subprocess.CompletedProcess(p.args, rc, "", log.read_text())
        return outcome(r, f"stopped in {took:.1f} s during {task}; workers left: {left or 'none'}; flow run {state}, "
                          f"task runs left Running: {tasks or 'none'}",
                       not left and not tasks and state == "CRASHED" and rc is not None, work_dirs(root))
    return run


def case_two_runs(ctx):
    root, d = ctx.dir("two-runs") / "root", ctx.dir("two-runs")
    first = start_run(root, d / "first.log")
    try:
        wait_for_task(root, first)
        second = start_run(root, d / "second.log")
        rc, took = wait_exit(second, 120)
        r = subprocess.CompletedProcess(second.args, rc, "", (d / "second.log").read_text())
        n = len(flow_runs(ctx.api, root))
        return outcome(r, f"refused in {took:.1f} s; {n} flow run(s) on the root (the first's only); the first "
                          "run's .partial dirs untouched by the second", n == 1)
    finally:
        first.send_signal(signal.SIGTERM)
        wait_exit(first, 60)


def case_sigkill(ctx):
    root, d = ctx.dir("sigkill") / "root", ctx.dir("sigkill")
    p = start_run(root, d / "run.log")
    workers, task = wait_for_task(root, p, "train-teacher")
    p.send_signal(signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    left = left_after(workers)
    gone = time.monotonic() - t0
    run = flow_runs(ctx.api, root)[0]
    before = api(ctx.api, f"/flow_runs/{run['id']}")["state"]["type"]
    left_dirs = work_dirs(root)
    r = cli("prepare", "--root", root, *sets(SMALL))
    after = final_state(ctx.api, run["id"], settle_s=0)
    tasks = running_task_runs(ctx.api, run["id"])
    line = next((x for x in r.stderr.splitlines() if x.startswith("warning: took over")), said(r))
    return Outcome(r.returncode, line, f"workers gone {gone:.1f} s after the kill ({task}; left: {left or 'none'}); "
                   f"flow run {before} until the next command, then {after}; task runs left Running: {tasks or 'none'}",
                   left_dirs, not left and not tasks and before == "RUNNING" and after == "CRASHED")


def case_no_server(ctx):
    d = ctx.dir("no-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(d / "home")}
    p = start_run(d / "root", d / "run.log", env)
    try:
        workers, _ = wait_for_task(d / "root", p)
        ok = bool(workers) and api(url, "/health") is True
        p.send_signal(signal.SIGTERM)
        rc, _ = wait_exit(p, 60)
        text = (d / "run.log").read_text()
        started = next((x for x in text.splitlines() if x.startswith("starting a Prefect server")), "")
        return Outcome(rc, started + " ... " + said(subprocess.CompletedProcess([], rc, "", text)),
                       "ran against the started server; it stays up for later runs", "-", ok)
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int((d / "home" / "server.pid").read_text()), signal.SIGTERM)


def resumable_work(root: Path, step: str, wait_s: float = 20) -> None:
    """Wait (at most `wait_s`) until the running `step` has work a kill would leave to resume: a
    checkpoint in a training step's `.partial` dir, a finished shard of an inference step; other
    steps are killed at once."""
    art = root / "artifacts" / "tiny"
    pattern = {"post-pretrain": "post_pretrain/*.partial/checkpoint", "train-teacher": "teachers/*/*.partial/checkpoint",
               "distill": "students/*.partial/checkpoint", "filter-score": "filter_scores/.*.shards/*",
               "teacher-logits": "logits/*/.*.shards/*"}.get(step)
    deadline = time.monotonic() + wait_s
    while pattern and not list(art.glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.05)


def case_kill_each_long_step(ctx) -> list[tuple[str, Outcome]]:
    """One root; per long step a run SIGKILLed once that step runs (shards of 16 rows, a checkpoint
    every 2 steps, so there is work to resume), the next run taking over; then a run to the end."""
    import pandas as pd
    from lmsys.data.validate import raw_ids
    root, d = ctx.dir("kill-each") / "root", ctx.dir("kill-each")
    # predict at batch 1: its 40 rows x 2 orders last long enough to be caught (a second at batch 32)
    over = {"orchestration.shard_rows": 16, "train_teacher.checkpoint_every": 2, "trainer.checkpoint_every": 2,
            "predict.batch_size": 1}
    rows = []
    for step in LONG_STEPS:
        t0 = time.monotonic()
        p = start_run(root, d / f"{step}.log", over=over)
        workers, task = wait_for_task(root, p, step, timeout=900, every=0.02)
        if not workers:
            rc = p.wait()
            text = (d / f"{step}.log").read_text()
            rows.append((step, Outcome(rc, said(subprocess.CompletedProcess([], rc, "", text)),
                                       "the run ended before the step started (cached or too fast)", "-", False)))
            continue
        resumable_work(root, step)
        p.send_signal(signal.SIGKILL)
        p.wait()
        left = left_after(workers)
        leftovers = work_dirs(root)
        runs = flow_runs(ctx.api, root)
        rows.append((step, Outcome(-9, f"SIGKILL during {task} after {time.monotonic() - t0:.0f} s",
                                   f"workers left: {left or 'none'}; flow run {runs[0]['state']['type'] if runs else '?'}"
                                   " until the next run takes the root", leftovers, not left, seconds=time.monotonic() - t0)))
    t0 = time.monotonic()
    p = start_run(root, d / "final.log", over=over)
    rc, took = wait_exit(p, 1800)
    text = (d / "final.log.out").read_text() + (d / "final.log").read_text()
    sub = root / "artifacts/tiny/predictions/submission.csv"
    ids = set(pd.read_csv(sub, dtype={"id": str})["id"]) if sub.exists() else set()
    expected = set(raw_ids(root / "data/demo/test.csv"))
    states = [r["state"]["type"] for r in flow_runs(ctx.api, root)]
    cached = re.search(r"(\d+) tasks, (\d+) cached", text)
    killed = sum(o.exit == -9 for _, o in rows)
    ok = rc == 0 and ids == expected and states.count("CRASHED") == killed and "RUNNING" not in states
    rows.append(("final run", Outcome(rc, (cached.group(0) if cached else said(subprocess.CompletedProcess([], rc, "", text))),
                                      f"submission answers {len(ids)}/{len(expected)} test ids; flow runs of the root: "
                                      f"{', '.join(f'{states.count(s)} {s}' for s in sorted(set(states)))}",
                                      work_dirs(root), ok, seconds=time.monotonic() - t0)))
    return rows


# ---------------------------------------------------------------- the cases

CASES: list[Case] = [
    Case("convert-null-completions", "#4", "convert-ut: a good row + `completions: null`", case_convert_null_completions,
         1, r"bad_completions: 1 \(first rows: 1\)"),
    Case("convert-chosen-null", "#4", "convert-ut: binarized row with `chosen: null`", case_convert_chosen(None),
         1, r"bad_chosen: 1 \(first rows: 1\)"),
    Case("convert-chosen-42", "#4", "convert-ut: binarized row with `chosen: 42`", case_convert_chosen(42),
         1, r"bad_chosen: 1 \(first rows: 1\)"),
    Case("convert-annotations-list", "#4", "convert-ut: `annotations` as a list of ratings", case_convert_annotations_list,
         0, r"1 battles"),
    Case("convert-identical-rows", "#4", "convert-ut: two identical rows", case_convert_identical,
         1, r"duplicate_row: 1 \(first rows: 1\)"),
    Case("out-csv-gz", "#8", "convert-ut --out x.csv.gz", case_out_suffix("ut.csv.gz"), 0, r"wrote .*ut\.csv\.gz"),
    Case("out-PARQUET", "#8", "convert-ut --out x.PARQUET", case_out_suffix("ut.PARQUET"), 0, r"wrote .*ut\.PARQUET"),
    Case("out-txt", "#8", "convert-ut --out x.txt", case_out_suffix("ut.txt"), 2, r"\.csv, \.csv\.gz or \.parquet"),
    Case("predict-out-json", "#8", "predict --out sub.json", case_predict_out("json"), 2, r"\.csv, \.csv\.gz or \.parquet"),
    Case("calibrate-apply-out-tsv", "#8", "calibrate apply --out o.tsv", case_calibrate_apply_suffix, 2,
         r"\.csv, \.csv\.gz or \.parquet"),
    Case("predict-out-dir", "#10", "predict --out <a directory>", case_predict_out("dir"), 2, r"is a directory"),
    Case("prepare-stale-quarantine", "#8", "prepare with a bad row, then with the file fixed", case_prepare_stale, 0,
         r"it is gone"),
    Case("prepare-ctrl-c", "#8", "Ctrl-C during prepare of a 90k-row train file", case_prepare_ctrl_c, 130,
         r"^error: interrupted \(Ctrl-C"),
    Case("odd-ids", "#7", "ids `١٢٣`, `１２３`, `1_000`, `+42` beside 123 and 1000", case_odd_ids, 1, r"bad_id: 4"),
    Case("empty-test-id", "#7", "predict on 20 test rows, one with an empty id", case_empty_test_id, 1,
         r"no id: answered as id ''"),
    Case("test-file-twice", "#5", "data.test naming the same file twice (prepare)", case_same_test_twice, 2,
         r"would answer them twice \(the same file twice\?\)"),
    Case("no-test", "#5", "data.train set, no data.test (prepare)", case_no_test, 2, r"data.test is not set"),
    Case("test-none", "#5", "data.test: none (prepare; plan)", case_test_none, 0, r"no predict step: True"),
    Case("test-ids-in-train", "#5", "3 test ids that are train ids (prepare)", case_shared_ids, 2,
         r"shares 3 id\(s\) with the test file"),
    Case("check-test-ids-in-train", "#5", "the same, `lmsys check`", case_check_shared_ids, 2,
         r"FAIL data: across files .*shares 3 id"),
    Case("folds-external-self", "#7", "folds train.csv --external train.csv", case_folds_same_external, 2,
         r"the same file twice"),
    Case("add-test-as-train", "#7", "data add test.csv --as train", case_add_test_as_train, 2, r"unlabelled"),
    Case("label-column", "#7", "data add of a train file with `label` instead of the winner columns", case_label_column,
         2, r"has a `label` column but not the winner columns"),
    Case("calibrate-one-row", "#9", "calibrate fit on one row", case_calibrate(1, None), 1, r"1 rows, fewer than the 50"),
    Case("calibrate-one-class", "#9", "calibrate fit on 300 rows of one class", case_calibrate(300, 2), 1,
         r"every label is 2"),
    Case("zero-byte-labels", "#10", "evaluate --labels <0-byte file>", case_zero_byte_labels, 2, r"labels\.csv: empty file \(0 bytes\)"),
    Case("missing-model", "#10", "predict --model <missing dir>", case_missing_model, 2, r"nope: no such model directory"),
    Case("truncated-weights", "#10", "predict --model <dir with a half safetensors file>", case_truncated_weights, 2,
         r"model\.safetensors.*truncated or corrupt"),
    Case("run-params", "#10", "lmsys run --params X", case_run_params, 2, r"--params .* is not taken"),
    Case("utf16", "#10", "validate a UTF-16 test.csv", case_utf16, 2, r"UTF-16 LE"),
    Case("set-lr-abc", "#6", "check --set distill.lr=abc", case_param("check", "--set", "distill.lr=abc"), 2,
         r"distill\.lr: 'abc' should be a valid number"),
    Case("set-batch-0", "#6", "check --set trainer.batch_size=0", case_param("check", "--set", "trainer.batch_size=0"),
         2, r"trainer\.batch_size: 0 should be greater than or equal to 1"),
    Case("set-n-folds-1", "#6", "check --set folds.n_folds=1", case_param("check", "--set", "folds.n_folds=1"), 2,
         r"folds\.n_folds: 1 should be greater than or equal to 2"),
    Case("set-n-folds-0-plan", "#6", "plan --set folds.n_folds=0", case_param("plan", "--set", "folds.n_folds=0"), 2,
         r"folds\.n_folds: 0 should be greater than or equal to 2"),
    Case("set-folds-3", "#6", "check --set folds=3 (a section set to a number)", case_param("check", "--set", "folds=3"),
         2, r"folds: 3 should be a valid dictionary"),
    Case("set-typo", "#6", "check --set distill.lrr=1e-3", case_param("check", "--set", "distill.lrr=1e-3"), 2,
         r"unknown config key 'distill\.lrr' \(did you mean 'distill\.lr'\?\)"),
    Case("profile-huge", "#6", "check with params.yaml `profile: huge`", case_param("check", params=params_with("profile", "huge")),
         2, r"unknown profile 'huge': params\.yaml has"),
    Case("params-list", "#6", "check --params <a YAML list>", case_param("check", params="- a\n- b\n"), 2,
         r"must be a mapping of sections"),
    Case("params-empty", "#6", "check --params <an empty file>", case_param("check", params=""), 2, r"got an empty file"),
    Case("params-binary", "#6", "check --params <binary bytes>", case_param("check", params="\x00\xff\xfe\x01"), 2,
         r"not (YAML|a text file)"),
    Case("params-no-data", "#6", "check --params <params.yaml without `data:`>", case_param("check", params=params_without("data")),
         2, r"data: missing"),
    Case("missing-file", "probe: bad input", "validate a file that does not exist", case_missing_file, 2, r"no such file"),
    Case("full-disk-out", "#10, probe: full disk", "validate --out on a full 64 KiB tmpfs", case_full_disk_out, 3,
         r"no space left on the device writing .*full-out/v"),
    Case("full-disk-root", "probe: full disk", "prepare --root on a 48 KiB tmpfs", case_full_disk_root, 3,
         r"no space left on the device writing"),
    Case("read-only-root-check", "#8, probe: read-only root", "check --root <read-only mount>", case_read_only_root("check"),
         2, r"FAIL root: writable .*Read-only file system"),
    Case("read-only-root-prepare", "probe: read-only root", "prepare --root <read-only mount>",
         case_read_only_root("prepare"), 2, r"Read-only file system"),
    Case("two-runs", "#1", "a second `lmsys run` on the root of a running one", case_two_runs, 2,
         r"is in use by pid \d+ on .*flow run [0-9a-f-]{36}"),
    Case("sigterm", "#3", "SIGTERM to `lmsys run` during train-teacher (kill, timeout, scancel)",
         stop_case(signal.SIGTERM, False, "sigterm"), 143, r"^error: terminated \(SIGTERM\)"),
    Case("ctrl-c", "#8, probe: Ctrl-C", "Ctrl-C (SIGINT to the process group) during train-teacher",
         stop_case(signal.SIGINT, True, "ctrl-c"), 130, r"^error: interrupted \(Ctrl-C"),
    Case("sigkill", "#2", "SIGKILL of `lmsys run` (2 local workers) during train-teacher, then the next command",
         case_sigkill, 0, r"took over the run lease of pid \d+ .*marked Crashed"),
    Case("no-server", "#3", "`lmsys run` with nothing at PREFECT_API_URL", case_no_server, 143,
         r"starting a Prefect server at"),
]
KILL_EACH = Case("kill-each-long-step", "probe: kill at each long step", "SIGKILL once each long step runs, then rerun",
                 None, -9, r"SIGKILL during")


# ---------------------------------------------------------------- fixtures, running, the table

def fixtures(base: Path) -> tuple[Path, Path]:
    """The demo competition (small) and a merged tiny model dir with its prior, as step 6 writes them."""
    from lmsys.data.demo import make_demo_data
    from lmsys.models import build_base_model, load_tokenizer, train_tokenizer
    demo, model = base / "demo", base / "model"
    make_demo_data(demo, rows=300, test_rows=60, external_rows=80, ut_rows=100, seed=0)
    train_tokenizer([(demo / "train.csv").read_text()[:200_000]], model, vocab_size=300)
    tok = load_tokenizer({"kind": "tiny-llama"}, model)
    build_base_model({"kind": "tiny-llama", "hidden": 32, "layers": 1, "heads": 2}, tok).save_pretrained(model)
    tok.save_pretrained(model)
    (model / "ensemble.json").write_text(json.dumps({"method": "mean", "class_prior": [0.5, 0.3, 0.2]}))
    return demo, model


def verdict(case: Case, o: Outcome) -> str:
    if o.skipped:
        return f"skipped: {o.skipped}"
    good = o.exit == case.exit and re.search(case.expect, o.message) and o.ok_lost and "[+ traceback]" not in o.message
    return "ok" if good else "FAIL"


def short(text: str, root: Path, n: int = 220) -> str:
    text = text.replace(str(root), "…").replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def table(rows: list[dict]) -> str:
    lines = ["| case | from | what the user did | exit (expected) | message | lost? | left on purpose | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['source']} | {r['what']} | {r['exit']} ({r['expected']}) | {r['message']} | "
                     f"{r['lost']} | {r['left']} | {r['verdict']} |")
    return "\n".join(lines)


def write_results(rows: list[dict], seconds: float, only: bool = False) -> None:
    """The table into RESULTS.md and RESULTS_JSON; with `only` (a --only run) its rows replace the rows of
    the same cases in the last full table, in CASES order, and the others stay."""
    if only and RESULTS_JSON.exists():
        old = json.loads(RESULTS_JSON.read_text())
        mine = {r["case"]: r for r in rows}
        order = [c.name for c in CASES]
        merged = {r["case"]: r for r in old["rows"]} | mine
        rows = sorted(merged.values(), key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
        seconds = old["seconds"]
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2) + "\n")
    n_ok = sum(r["verdict"] == "ok" for r in rows)
    head = (f"{n_ok} of {len(rows)} cases ok; generated by `nice -n 10 python benchmarks/fault_table.py` in "
            f"{seconds / 60:.0f} min on {platform.node()} ({os.cpu_count()} cores, {platform.platform()}, Python "
            f"{platform.python_version()}), {time.strftime('%Y-%m-%d')}. Paths under the script's work dir are shown "
            "as `…`. *left on purpose*: resumable work a stop leaves (training `.partial` dirs with checkpoints, "
            "inference shards `.<name>.shards`) and temp files of atomic writes (never published, replaced by the next "
            "write); every published output is whole.")
    block = f"{MARK[0]}\n{head}\n\n{table(rows)}\n{MARK[1]}"
    md = RESULTS_MD.read_text()
    if MARK[0] in md:
        md = md[: md.index(MARK[0])] + block + md[md.index(MARK[1]) + len(MARK[1]):]
    else:
        md = md.rstrip() + "\n\n## Fault table (issue 22): what users do, on this CPU\n\n" + block + "\n"
    RESULTS_MD.write_text(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="these cases only (names; kill-each-long-step for the kill series)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", help="work here and keep it (default: a temp dir, removed)")
    ap.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    args = ap.parse_args()
    if args.list:
        for c in [*CASES, KILL_EACH]:
            print(f"{c.name:<28} {c.source:<28} {c.what}")
        return 0
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmsys-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(base / "prefect-home")
    from flows.server import ensure
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = ensure(f"http://127.0.0.1:{port}/api", say=lambda line: print(line, file=sys.stderr))
    os.environ["PREFECT_API_URL"] = url
    t0 = time.monotonic()
    rows: list[dict] = []
    try:
        demo, model = fixtures(base)
        ctx = Ctx(base, demo, model, url)
        todo = [c for c in CASES if not args.only or c.name in args.only]
        for case in todo:
            t = time.monotonic()
            try:
                o = case.run(ctx)
            except Exception as e:              # noqa: BLE001  (a case that breaks is a FAIL row, not the end)
                o = Outcome(None, f"the case itself failed: {type(e).__name__}: {e}", "?", "-", False)
            o.seconds = time.monotonic() - t
            rows.append(row(case, o, base))
            print(f"[{rows[-1]['verdict']:<4}] {case.name} ({o.seconds:.0f} s): exit {o.exit}: {o.message[:160]}",
                  file=sys.stderr, flush=True)
        if not args.only or KILL_EACH.name in args.only:
            for step, o in case_kill_each_long_step(ctx):
                c = Case(f"kill at {step}", KILL_EACH.source, KILL_EACH.what if step != "final run" else
                         "the run after the kills, to the end", None, 0 if step == "final run" else -9,
                         r"\d+ tasks, \d+ cached" if step == "final run" else KILL_EACH.expect)
                rows.append(row(c, o, base))
                print(f"[{rows[-1]['verdict']:<4}] kill at {step}: {o.message[:120]} | {o.lost[:120]} | {o.left[:120]}",
                      file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int((base / "prefect-home" / "server.pid").read_text()), signal.SIGTERM)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(table(rows))
    if not args.no_write:
        write_results(rows, time.monotonic() - t0, only=bool(args.only))
    return 0 if all(r["verdict"] != "FAIL" for r in rows) else 1


def row(case: Case, o: Outcome, base: Path) -> dict:
    return {"case": case.name, "source": case.source, "what": case.what, "exit": o.exit, "expected": case.exit,
            "message": short(o.message, base), "lost": short(o.lost, base, 160), "left": short(o.left, base, 200),
            "verdict": verdict(case, o), "seconds": round(o.seconds, 1)}


if __name__ == "__main__":
    sys.exit(main())
