"""What users do (issue 22), one case per test: malformed rows, misnamed or unwritable outputs,
inputs that fit together badly, degenerate calibration, messages that must name the thing, and
the worker processes of a run that dies. Each test fails on d5c1397 (the code the issue probed).

The real commands run as subprocesses (`python -m lmsys.cli ...`); the run-level faults (two runs
on one root, SIGKILL, SIGTERM, Ctrl-C of `lmsys run`) are in tests/orchestration/test_run_faults.py.
Parameter validation (types, ranges, unknown keys, params files) is tests/test_param_faults.py.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmsys.config import load_config
from lmsys.data import schema
from lmsys.paths import Layout

GOOD = {"model_a": "m1", "model_b": "m2", "prompt": '["what is two plus two"]', "response_a": '["four"]',
        "response_b": '["it is 4"]', "winner_model_a": "1", "winner_model_b": "0", "winner_tie": "0"}
TEST_GOOD = {k: GOOD[k] for k in ("prompt", "response_a", "response_b")}


def default_sigint() -> None:
    """preexec_fn of a command the test stops with Ctrl-C: SIGINT back to its default, as a terminal has it.
    A shell starts background jobs with SIGINT ignored, their children inherit that, and Python then keeps
    it ignored (so does lmsys: a run started under nohup is not stopped by a stray Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def lmsys(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmsys.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def write_rows(path: Path, rows: list[dict], columns=schema.KAGGLE_TRAIN_COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- finding 4: convert-ut

def _openbmb(instruction="Name a colour.", completions="default") -> dict:
    comp = lambda m, r, s: {"model": m, "response": r, "overall_score": s}  # noqa: E731
    return {"instruction": instruction,
            "completions": [comp("m1", "red", 8.0), comp("m2", "blue", 6.5)] if completions == "default" else completions}


def _convert(tmp_path: Path, rows: list[dict], out: str = "ut.parquet") -> subprocess.CompletedProcess:
    (tmp_path / "raw.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return lmsys("convert-ut", tmp_path / "raw.jsonl", "--out", tmp_path / out)


def test_convert_ut_skips_null_completions_naming_the_row(tmp_path):
    r = _convert(tmp_path, [_openbmb(), _openbmb("q", completions=None)])
    assert r.returncode == 1, r.stderr
    assert "bad_completions: 1 (first rows: 1)" in r.stderr and "Traceback" not in r.stderr
    assert len(pd.read_parquet(tmp_path / "ut.parquet")) == 1


@pytest.mark.parametrize("chosen", [None, 42])
def test_convert_ut_skips_a_binarized_chosen_that_is_not_a_conversation(tmp_path, chosen):
    msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    good = {"prompt": "a?", "chosen": msgs("a?", "yes"), "rejected": msgs("a?", "no"), "score_chosen": 9, "score_rejected": 2}
    r = _convert(tmp_path, [good, {**good, "prompt": "b?", "chosen": chosen}])
    assert r.returncode == 1, r.stderr
    assert "bad_chosen: 1 (first rows: 1)" in r.stderr and "Traceback" not in r.stderr


def test_convert_ut_reads_an_annotations_list(tmp_path):
    """The aspect ratings as a list of {Rating} objects instead of a dict by aspect: scored, not a crash."""
    comp = lambda r, ratings: {"model": "m", "response": r, "annotations": [{"Rating": x} for x in ratings]}  # noqa: E731
    r = _convert(tmp_path, [_openbmb(completions=[comp("red", ["5", "4"]), comp("blue", ["2", "1"])])])
    assert r.returncode == 0, r.stderr
    assert pd.read_parquet(tmp_path / "ut.parquet")[schema.WINNER_COLUMNS].to_numpy().tolist() == [[1, 0, 0]]


def test_convert_ut_counts_identical_rows(tmp_path):
    r = _convert(tmp_path, [_openbmb(), _openbmb(), _openbmb("Count to two.")])
    assert r.returncode == 1 and "duplicate_row: 1 (first rows: 1)" in r.stderr, r.stderr
    assert "3 rows -> 2 battles" in r.stdout


# ---------------------------------------------------------------- finding 8: outputs

@pytest.mark.parametrize("name", ["ut.csv.gz", "ut.PARQUET", "ut.CSV.GZ"])
def test_outputs_are_written_in_the_format_their_suffix_names(tmp_path, name):
    from lmsys.data.validate import validate_file
    r = _convert(tmp_path, [_openbmb()], out=name)
    assert r.returncode == 0, r.stderr
    data = (tmp_path / name).read_bytes()
    assert data[:2] == b"\x1f\x8b" if name.lower().endswith(".gz") else data[:4] == b"PAR1" if name.endswith("PARQUET") \
        else data.startswith(b"id,")
    assert len(validate_file(tmp_path / name, source="ultrafeedback").clean) == 1    # the project's reader takes it


@pytest.mark.parametrize("command", ["convert-ut", "predict", "calibrate apply"])
def test_an_output_suffix_that_names_no_format_is_refused_before_any_work(tmp_path, command):
    out = tmp_path / "result.txt"
    args = {"convert-ut": ["convert-ut", tmp_path / "missing.jsonl", "--out", out],
            "predict": ["predict", "--test", tmp_path / "missing.csv", "--model", tmp_path, "--out", out],
            "calibrate apply": ["calibrate", "apply", "--preds", tmp_path / "missing.csv", "--params-file",
                                tmp_path / "missing.json", "--out", out]}[command]
    r = lmsys(*args)
    assert r.returncode == 2 and "result.txt" in error_line(r) and ".csv, .csv.gz or .parquet" in error_line(r)
    assert not out.exists()


def test_prepare_publishes_one_set_and_drops_what_an_earlier_run_left(tmp_path, demo_dir):
    """A quarantine file of a file no longer listed goes; a prepare that fails halfway publishes nothing."""
    from lmsys.steps.prepare import run_prepare
    train = pd.read_csv(demo_dir / "train.csv", dtype=str, keep_default_na=False)
    bad = train.copy()
    bad.loc[0, "prompt"] = "[broken"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    layout = Layout("tiny", tmp_path / "root")
    cfg = {**load_config("tiny", {"data.train": str(tmp_path / "bad.csv"), "data.test": str(demo_dir / "test.csv")}),
           "root": str(layout.root)}
    run_prepare(cfg, layout)
    assert (layout.prepared / "quarantine_train_bad.csv").exists()
    cfg["data"]["train"] = str(demo_dir / "train.csv")
    run_prepare(cfg, layout)
    assert not (layout.prepared / "quarantine_train_bad.csv").exists()            # stale: gone
    before = {p.name: p.read_bytes() for p in layout.prepared.iterdir()}
    cfg["data"]["test"] = [str(demo_dir / "test.csv"), str(demo_dir / "test.csv")]   # fails after reading every file
    cfg["data"]["train"] = str(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="id"):
        run_prepare(cfg, layout)
    assert {p.name: p.read_bytes() for p in layout.prepared.iterdir()} == before   # the last whole set, untouched
    assert not [p for p in layout.art.iterdir() if p.name.startswith(".prepared")]    # no staged leftovers


def test_ctrl_c_of_a_step_command_is_one_line_and_leaves_the_last_whole_set(tmp_path, demo_dir):
    """SIGINT while `lmsys prepare` validates a large train file: exit 130, one line, no traceback,
    prepared/ as the previous prepare left it (issue: new files beside the old ones)."""
    train = pd.read_csv(demo_dir / "train.csv", dtype=str, keep_default_na=False)
    big = pd.concat([train.assign(id=train["id"] + f"{i:03d}") for i in range(150)], ignore_index=True)
    big.to_csv(tmp_path / "big.csv", index=False)
    root = tmp_path / "root"
    sets = ["--set", f"data.train={demo_dir / 'train.csv'}", "--set", f"data.test={demo_dir / 'test.csv'}"]
    assert lmsys("prepare", "--root", root, *sets).returncode == 0
    before = {p.name: p.read_bytes() for p in (root / "artifacts/tiny/prepared").iterdir()}
    p = subprocess.Popen([sys.executable, "-m", "lmsys.cli", "prepare", "--root", str(root), "--set",
                          f"data.train={tmp_path / 'big.csv'}", "--set", f"data.test={demo_dir / 'test.csv'}"],
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 60
    while not (root / "artifacts/.lease.json").exists() and time.monotonic() < deadline:   # inside the command
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C")
    assert {q.name: q.read_bytes() for q in (root / "artifacts/tiny/prepared").iterdir()} == before


def test_ids_are_ascii_digits_only(tmp_path):
    """Arabic-Indic or full-width digits, `1_000` and `+42` are not read as numbers: quarantined as
    bad_id, and the genuine 123 and 1000 stay clean (not duplicates of them)."""
    from lmsys.data.validate import validate_file
    odd = ["\u0661\u0662\u0663", "\uff11\uff12\uff13", "1_000", "+42", "4.2e1"]
    write_rows(tmp_path / "t.csv", [{"id": i, **GOOD, "prompt": f'["p{n}"]'} for n, i in enumerate(["123", "1000", "42.0", *odd])])
    v = validate_file(tmp_path / "t.csv")
    assert v.clean["id"].tolist() == ["123", "1000", "42"]
    assert v.quarantine["reason"].tolist() == ["bad_id"] * len(odd) and v.quarantine["id"].tolist() == odd


def test_an_empty_test_id_is_answered_by_the_fallback_and_named(tmp_path, final_model):
    rows = [{"id": str(100 + i), **TEST_GOOD} for i in range(4)] + [{"id": "", **TEST_GOOD}]
    test = write_rows(tmp_path / "test.csv", rows, schema.KAGGLE_TEST_COLUMNS)
    r = lmsys("predict", "--test", test, "--model", final_model, "--out", tmp_path / "sub.csv")
    assert r.returncode == 1, r.stderr
    assert "row 4 (no id: answered as id '')" in r.stderr and "missing_id" in r.stderr
    sub = pd.read_csv(tmp_path / "sub.csv", dtype={"id": str}, keep_default_na=False)
    assert len(sub) == len(rows) and sorted(sub["id"]) == sorted(x["id"] for x in rows)   # 5 in, 5 out
    np.testing.assert_allclose(sub.loc[sub["id"] == "", schema.WINNER_COLUMNS].to_numpy(), [[0.5, 0.3, 0.2]])


# ---------------------------------------------------------------- finding 5: the test set, before the training

def _data(demo_dir: Path, **over) -> dict:
    return {"data.train": str(demo_dir / "train.csv"), "data.test": str(demo_dir / "test.csv"),
            "data.external": [str(demo_dir / "external_33k.jsonl")], "data.ut": str(demo_dir / "ut.parquet"), **over}


def _preflight(cfg: dict) -> list[str]:
    from lmsys.check import FAIL, data_checks
    lines, _ = data_checks(cfg, Layout.of(cfg))
    return [c.detail for c in lines if c.status == FAIL]


def test_the_same_test_file_twice_fails_the_preflight_and_prepare(tmp_path, demo_dir):
    test = str(demo_dir / "test.csv")
    cfg = {**load_config("tiny", _data(demo_dir, **{"data.test": [test, test]})), "root": str(tmp_path)}
    fails = _preflight(cfg)
    assert len(fails) == 1 and "id(s) in both" in fails[0] and "the same file twice" in fails[0]
    sets = [a for k, v in _data(demo_dir, **{"data.test": [test, test]}).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    r = lmsys("prepare", "--root", tmp_path, *sets)
    assert r.returncode == 2 and "would answer them twice" in error_line(r)
    assert not (tmp_path / "artifacts/tiny/prepared").exists()


def test_no_test_file_is_an_error_unless_data_test_is_none(tmp_path, demo_dir):
    from lmsys.steps.prepare import run_prepare
    from lmsys.steps.recipe import tasks_of
    cfg = {**load_config("tiny", _data(demo_dir, **{"data.test": None})), "root": str(tmp_path)}
    assert any("data.test is not set" in f for f in _preflight(cfg))
    with pytest.raises(ValueError, match="data.test is not set"):
        run_prepare(cfg, Layout.of(cfg))
    cfg = {**load_config("tiny", _data(demo_dir, **{"data.test": "none"})), "root": str(tmp_path)}
    assert _preflight(cfg) == []
    run_prepare(cfg, Layout.of(cfg))                                            # explicit: no test set
    assert "predict" not in [n for n, _ in tasks_of(cfg)] and "evaluate" in [n for n, _ in tasks_of(cfg)]


def test_test_ids_shared_with_the_training_data_fail_the_preflight(tmp_path, demo_dir):
    test = pd.read_csv(demo_dir / "test.csv", dtype=str, keep_default_na=False)
    train_ids = pd.read_csv(demo_dir / "train.csv", dtype=str)["id"]
    test.loc[:2, "id"] = train_ids[:3].to_numpy()
    test.to_csv(tmp_path / "test.csv", index=False)
    cfg = {**load_config("tiny", _data(demo_dir, **{"data.test": str(tmp_path / "test.csv")})), "root": str(tmp_path)}
    fails = _preflight(cfg)
    assert len(fails) == 1 and "shares 3 id(s) with the test file(s)" in fails[0]


def _read_only_dir(tmp_path: Path):
    """A read-only mount (as root a tmpfs mounted ro, which permissions cannot fake for root)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        return d, lambda: d.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], check=True)
    return d, lambda: subprocess.run(["umount", str(d)], check=True)


def test_a_read_only_root_fails_the_preflight_and_the_step_commands(tmp_path, demo_dir):
    from lmsys.check import FAIL, root_check
    ro, undo = _read_only_dir(tmp_path)
    try:
        line = root_check(Layout("tiny", ro))
        assert line.status == FAIL and str(ro) in line.detail
        r = lmsys("prepare", "--root", ro)
        assert r.returncode == 2 and str(ro) in error_line(r)
    finally:
        undo()


# ---------------------------------------------------------------- finding 7: inputs that fit together badly

def test_folds_with_the_competition_file_as_external_is_refused(tmp_path, demo_dir):
    train = demo_dir / "train.csv"
    r = lmsys("folds", train, "--external", train, "--n-folds", 2, "--out", tmp_path)
    assert r.returncode == 2 and "the same file twice" in error_line(r) and "already in" in error_line(r)
    assert not (tmp_path / "folds.csv").exists()


def test_data_add_of_an_unlabelled_file_as_train_is_refused(tmp_path, demo_dir):
    r = lmsys("data", "add", demo_dir / "test.csv", "--as", "train", "--no-dvc", "--no-event")
    assert r.returncode == 2 and "unlabelled" in error_line(r) and "--as test" in error_line(r)


def test_a_label_column_instead_of_the_winner_columns_is_refused(tmp_path, demo_dir):
    train = pd.read_csv(demo_dir / "train.csv", dtype=str, keep_default_na=False)
    labels = train[schema.WINNER_COLUMNS].astype(int).to_numpy().argmax(1)
    train.drop(columns=schema.WINNER_COLUMNS).assign(label=labels).to_csv(tmp_path / "train.csv", index=False)
    r = lmsys("validate", tmp_path / "train.csv")
    assert r.returncode == 2 and "has a `label` column but not the winner columns" in error_line(r)
    r = lmsys("data", "add", tmp_path / "train.csv", "--no-dvc", "--no-event")
    assert r.returncode == 2                                                    # not filed as test


# ---------------------------------------------------------------- finding 9: degenerate calibration

def _preds(path: Path, n: int, labels=None) -> Path:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(n, 3)), columns=schema.LOGIT_COLUMNS)
    df.insert(0, "id", range(n))
    df["label"] = rng.integers(0, 3, n) if labels is None else labels
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("n, labels, why", [(1, None, "1 rows, fewer than the 50"),
                                             (300, 2, "every label is 2: a fit needs at least two classes")])
def test_calibrate_fit_refuses_a_degenerate_fit(tmp_path, n, labels, why):
    r = lmsys("calibrate", "fit", "--preds", _preds(tmp_path / "p.csv", n, labels), "--out", tmp_path / "c.json")
    assert r.returncode == 1 and why in r.stderr, r.stderr
    params = json.loads((tmp_path / "c.json").read_text())
    assert params["fallback"] is True and why in params["reason"]
    assert (params["scale"], params["bias"]) == ([1.0] * 3, [0.0] * 3)           # the identity, not biases of +-15


def test_the_calibrate_step_records_a_refused_fold(tmp_path):
    """Cross-fitted calibration whose other fold has too few rows: that fold gets the identity, flagged."""
    from lmsys.steps.student import run_calibrate
    cfg = load_config("tiny", {"folds.n_folds": 2})
    layout = Layout("tiny", tmp_path)
    rng = np.random.default_rng(1)
    for fold, n in ((0, 10), (1, 400)):
        z = rng.normal(size=(n, 3))
        df = pd.DataFrame(z, columns=schema.LOGIT_COLUMNS).assign(id=[f"{fold}-{i}" for i in range(n)], split="val",
                                                              swapped=False, label=rng.integers(0, 3, n))
        path = layout.logits("llama", fold)
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path)
    res = run_calibrate(cfg, layout, "llama")
    assert res.metrics["fallback_folds"] == [1]                                 # fold 1 would be fitted on fold 0's 10 rows
    saved = json.loads(layout.calibration("llama").read_text())["folds"]
    assert saved["1"]["fallback"] is True and "10 rows" in saved["1"]["reason"] and not saved["0"]["fallback"]


# ---------------------------------------------------------------- finding 10: messages that name the thing

def test_a_zero_byte_labels_file_is_named(tmp_path):
    (tmp_path / "labels.csv").write_bytes(b"")
    r = lmsys("evaluate", "--preds", _preds(tmp_path / "p.csv", 10), "--labels", tmp_path / "labels.csv")
    assert r.returncode == 2 and f"{tmp_path / 'labels.csv'}: empty file (0 bytes)" in error_line(r)


def test_a_missing_model_dir_is_named_before_any_work(tmp_path, demo_dir):
    r = lmsys("predict", "--test", demo_dir / "test.csv", "--model", tmp_path / "nope", "--out", tmp_path / "s.csv")
    assert r.returncode == 2 and f"{tmp_path / 'nope'}: no such model directory" in error_line(r)


def test_a_truncated_safetensors_file_is_named(tmp_path, demo_dir, final_model):
    model = tmp_path / "model"
    shutil.copytree(final_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = lmsys("predict", "--test", demo_dir / "test.csv", "--model", model, "--out", tmp_path / "s.csv")
    assert r.returncode == 2 and "model.safetensors" in error_line(r) and "truncated or corrupt" in error_line(r)


def test_predict_out_a_directory_fails_before_inference(tmp_path, demo_dir, final_model):
    t0 = time.perf_counter()
    r = lmsys("predict", "--test", demo_dir / "test.csv", "--model", final_model, "--out", tmp_path)
    assert r.returncode == 2 and f"{tmp_path}: is a directory" in error_line(r)
    assert time.perf_counter() - t0 < 30


def test_run_with_params_is_an_error_line_exit_2(tmp_path):
    r = lmsys("run", "--params", tmp_path / "p.yaml", "--root", tmp_path)
    assert r.returncode == 2 and "--params" in error_line(r)


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16 LE"), ("utf-16-be", "UTF-16 or UTF-32 (NUL bytes")])
def test_utf16_input_names_the_encoding(tmp_path, demo_dir, encoding, name):
    text = (demo_dir / "test.csv").read_text(encoding="utf-8")
    (tmp_path / "t.csv").write_bytes(text.encode(encoding))
    r = lmsys("validate", tmp_path / "t.csv")
    assert r.returncode == 2 and name in error_line(r) and "save it as UTF-8" in error_line(r)


def test_a_full_disk_names_the_file(tmp_path, demo_dir):
    """ENOSPC on a 64 KiB tmpfs: exit 3 (the machine), the file named, no traceback."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        r = lmsys("validate", demo_dir / "train.csv", "--out", full / "v")
        line = error_line(r)
        assert r.returncode == 3 and "no space left on the device writing" in line and str(full / "v") in line
        assert not [p for p in (full / "v").iterdir() if not p.name.startswith(".")] or \
            all(p.stat().st_size for p in (full / "v").iterdir())              # nothing half-written published
    finally:
        subprocess.run(["umount", str(full)], check=True)


# ---------------------------------------------------------------- finding 2: workers of a run that dies

POOL = """
import sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing as mp
from flows.runners import local_worker_setup
def work(i):
    import os
    open(f"{sys.argv[1]}/worker{i}", "w").write(str(os.getpid()))
    time.sleep(600)
if __name__ == "__main__":
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), initializer=local_worker_setup,
                             initargs=(True,)) as ex:
        list(ex.map(work, range(2)))
"""


def test_local_workers_exit_when_the_run_is_killed(tmp_path):
    """The local runner's workers (flows.runners.local_worker_setup) outlive a SIGKILLed parent by
    at most a few seconds; without the watchdog they finish their task for a dead run, then wait."""
    (tmp_path / "pool.py").write_text(POOL)
    p = subprocess.Popen([sys.executable, str(tmp_path / "pool.py"), str(tmp_path)],
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    files = [tmp_path / f"worker{i}" for i in range(2)]
    deadline = time.monotonic() + 120
    while not all(f.exists() and f.read_text() for f in files) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [int(f.read_text()) for f in files]
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 5
    alive = lambda pid: os.path.exists(f"/proc/{pid}") and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]  # noqa: E731
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert left == []


HANGING = """
import sys, threading, time
from flows.interrupt import stop_on_signal
from lmsys import lease
with lease.hold(sys.argv[1]), stop_on_signal(None, deadline_s=2):
    try:
        print("ready", flush=True)
        time.sleep(600)
    finally:
        threading.Event().wait(600)      # like a task thread the thread runner waits for: the unwinding hangs
"""


def test_a_stopped_run_whose_unwinding_hangs_ends_at_the_deadline(tmp_path):
    """Ctrl-C during a run that cannot unwind (a task in a thread of the thread runner): the process
    still ends within seconds (flows.interrupt's deadline), exit 130, one line, its lease released."""
    p = subprocess.Popen([sys.executable, "-c", HANGING, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, preexec_fn=default_sigint)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130 and time.monotonic() - t0 < 10, err
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]] and err.startswith("error: interrupted (Ctrl-C")
    assert not (tmp_path / "artifacts" / ".lease.json").exists()
