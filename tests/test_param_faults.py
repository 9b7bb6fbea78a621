"""Issue 22 finding 6: parameters are checked against the schema (lmsys/settings.py) before any work,
by `lmsys check` and every command: a wrong type, a value out of range, an unknown key or profile, a
params file that is no mapping of sections. Each is exit 2 with one `error:` line naming the key."""
from __future__ import annotations

import pytest
import yaml

from lmsys.cli import main
from lmsys.config import PARAMS_PATH


@pytest.mark.parametrize("command", [["check"], ["plan", "--gpus", "8"], ["folds"], ["config"]])
@pytest.mark.parametrize("setting, key", [
    ("distill.lr=abc", "distill.lr"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("folds.n_folds=1", "folds.n_folds"),
    ("folds.n_folds=0", "folds.n_folds"),
    ("folds=3", "folds"),
    ("distill.lrr=1e-3", "distill.lrr"),
])
def test_a_bad_parameter_stops_every_command_before_work(tmp_path, capsys, command, setting, key):
    code = main([*command, "--profile", "tiny", "--set", setting, *(["--root", str(tmp_path)] if command[0] != "config" else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and key in err and err.count("\n") == 1, err
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "data").exists()     # nothing ran


def test_an_unknown_profile_in_params_yaml_names_the_profiles(tmp_path, capsys):
    raw = yaml.safe_load(PARAMS_PATH.read_text())
    raw["profile"] = "huge"
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["check", "--params", str(p), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'huge'" in err and "tiny" in err and "gpu-smoke" in err


@pytest.mark.parametrize("content", [b"- a\n- b\n", b"", b"a string\n", b"\x00\xff\xfe\x01", b"folds: [1\n"])
def test_a_params_file_that_is_no_mapping_is_exit_2(tmp_path, capsys, content):
    p = tmp_path / "params.yaml"
    p.write_bytes(content)
    assert main(["check", "--params", str(p), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}") and err.count("\n") == 1, err


def test_a_params_file_missing_a_section_names_it(tmp_path, capsys):
    raw = yaml.safe_load(PARAMS_PATH.read_text())
    del raw["data"]
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["check", "--params", str(p), "--root", str(tmp_path)]) == 2
    assert "data: missing" in capsys.readouterr().err
