"""params.yaml resolution: the one precedence rule, `lmsys config`, the schema, and the view a step gets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmsys.config import (PARAMS_PATH, PROFILES, ConfigError, UndeclaredKey, explain, for_step, load_config,
                          param_sources)

HERE = Path(__file__).resolve().parent
# the resolved configuration of every profile at d5c1397, before the precedence rule was changed
BEFORE = json.loads((HERE / "data" / "resolved_config_d5c1397.json").read_text())
# Every value that differs from d5c1397, and why. Issue 21 made two code defaults explicit in params.yaml,
# each the effective value before: post_pretrain evaluated only at the end (the step passed
# eval_every=None), tiny_vocab defaulted to 1024. Issue 19 added the trainer's packing switch, the steps'
# GPU widths, the recipe's teacher evaluation (full: once, at the end), the inference path (`infer`), the
# local-gpus runner's devices, and repriced the estimates; tiny packs no more than a row (its CPU's dense
# packed mask), small does not pack (an encoder student, a CPU).
MADE_EXPLICIT = {"post_pretrain.eval_every": None, "models.tiny_vocab": 1024}
TRAINING = ("trainer", "post_pretrain", "train_teacher", "distill")
ISSUE_19 = {**{f"{s}.{k}": v for s in TRAINING for k, v in (("packing", True), ("pack_tokens", 4096))},
            "orchestration.step_gpus": "per profile",
            "infer.packed": "auto", "infer.pack_tokens": 16384, "infer.verified_capabilities": ["9.0"],
            "orchestration.local_gpus": "auto"}
# Issue 20: the serving target (serve.*; full and gpu-smoke serve on 2xT4), predict on every device, and the
# GPTQ kernel chosen per device (gpu-smoke's explicit Triton became auto: Triton on a GPU, nothing built).
ISSUE_20 = {"predict.devices": "auto", "serve.cards": None, "serve.dtype": "auto", "serve.nonfinite": "recompute"}
ISSUE_20_PROFILES = {"full": {"serve.cards": "2xT4"},
                     "gpu-smoke": {"serve.cards": "2xT4", "quantize.backend": "auto"}}
ISSUE_19_PROFILES = {"tiny": {f"{s}.pack_tokens": 256 for s in TRAINING}, "small": {f"{s}.packing": False for s in TRAINING}}
REPRICED = "orchestration.estimate."               # lmsys plan's figures (tests/test_plan.py checks them)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def params_copy(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(PARAMS_PATH.read_text())
    edit(raw)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_resolves_as_before(profile):
    """The precedence change left every profile's values where they were (the profiles that relied on
    the old rule state their distill.lr themselves now)."""
    before, now = flat(BEFORE[profile]), flat(json.loads(json.dumps(load_config(profile), default=str)))
    changed = {k: (before.get(k, "<absent>"), now.get(k, "<absent>")) for k in before.keys() | now.keys()
               if before.get(k, "<absent>") != now.get(k, "<absent>") and not k.startswith(REPRICED)}
    issue_20 = {**ISSUE_20, **ISSUE_20_PROFILES.get(profile, {})}
    assert all(changed[k][1] == v for k, v in issue_20.items() if k in changed)
    later = {k for k in changed if k in ISSUE_19 or k in issue_20 or k.startswith("orchestration.step_gpus")}
    if profile == "full":
        later.add("train_teacher.eval_every")
        assert changed["train_teacher.eval_every"] == (400, None)
        node = {"orchestration.slurm.gpus_per_job": (1, 8), "orchestration.slurm.max_jobs": (8, 1),
                "orchestration.slurm.cores": (16, 64), "orchestration.slurm.memory": ("128GB", "1000GB")}
        assert {k: changed[k] for k in node} == node                   # one 8-GPU node job for data-parallel steps
        later |= set(node)
    issue_19 = {**ISSUE_19, **ISSUE_19_PROFILES.get(profile, {})}
    assert all(changed[k][1] == issue_19[k] for k in later if k in ISSUE_19 and k != "orchestration.step_gpus")
    assert {k: v for k, v in changed.items() if k not in later} == \
        {k: (before.get(k, "<absent>"), v) for k, v in MADE_EXPLICIT.items()}


def test_distill_lr_in_the_base_section_reaches_every_profile_that_does_not_set_it(tmp_path):
    """The rule: a key a training section sets itself beats every layer's `trainer` default."""
    p = params_copy(tmp_path, lambda raw: raw["distill"].__setitem__("lr", 7.0e-5))
    own = {name for name, over in yaml.safe_load(p.read_text())["profiles"].items()
           if "lr" in ((over or {}).get("distill") or {})}
    assert own == {"tiny", "small", "gpu-smoke"}
    for profile in PROFILES:
        want = load_config(profile)["distill"]["lr"] if profile in own else 7.0e-5
        assert load_config(profile, params_path=p)["distill"]["lr"] == want, profile
    assert load_config("full", params_path=p)["train_teacher"]["lr"] == 1.0e-5     # the trainer default elsewhere


def test_a_profile_trainer_default_does_not_beat_a_base_section_key(tmp_path):
    p = params_copy(tmp_path, lambda raw: raw["profiles"]["tiny"]["distill"].pop("lr"))
    cfg = load_config("tiny", params_path=p)
    assert cfg["trainer"]["lr"] == 2.0e-3 and cfg["distill"]["lr"] == 5.0e-5 and cfg["train_teacher"]["lr"] == 2.0e-3


def test_set_trainer_key_reaches_the_sections_that_do_not_set_it():
    cfg = load_config("tiny", {"trainer.lr": 0.1, "trainer.batch_size": 3})
    assert cfg["train_teacher"]["lr"] == cfg["post_pretrain"]["lr"] == 0.1
    assert cfg["distill"]["lr"] == 2.0e-3                                  # distill sets lr itself
    assert cfg["distill"]["batch_size"] == cfg["train_teacher"]["batch_size"] == 3
    assert load_config("tiny", {"distill.lr": 0.5})["distill"]["lr"] == 0.5  # a section's own key: always


def test_lmsys_config_shows_where_a_value_comes_from(capsys):
    from lmsys.cli import main
    assert main(["config", "--profile", "tiny", "distill.lr", "distill.batch_size"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "distill.lr = 0.002"
    assert "params.yaml" in out[1] and "distill.lr = 5.0e-05" in out[1]
    assert "profiles.tiny" in out[2] and "distill.lr = 0.002" in out[2] and out[2].endswith("<- wins")
    assert "does not apply: distill sets lr itself" in out[3]
    assert out[4] == "distill.batch_size = 16" and "trainer.batch_size = 4" in out[5]
    assert "trainer.batch_size = 16" in out[6] and out[6].endswith("<- wins")
    assert main(["config", "--profile", "small"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved == json.loads(json.dumps(load_config("small")))
    assert main(["config", "distill.lrr"]) == 2
    assert "did you mean 'distill.lr'" in capsys.readouterr().err


def test_explain_a_section_lists_each_key_and_an_override():
    lines = explain("distill", "full", {"distill.temperature": 2.0})
    assert "distill.temperature = 2.0" in lines and any(line.startswith("  --set") for line in lines)
    assert any(line.startswith("distill.warmup_steps = 100") for line in lines)


def test_dvc_params_of_a_training_section_follow_the_rule():
    """distill under tiny sets lr and epochs itself: trainer.lr is no dependency of its stage, the trainer
    keys it falls back on are."""
    src = param_sources("distill", "tiny")
    assert src[:2] == ["distill", "profiles.tiny.distill"]
    assert "trainer.lr" not in src and "profiles.tiny.trainer.lr" not in src and "trainer.epochs" not in src
    assert {"trainer.batch_size", "profiles.tiny.trainer.batch_size", "trainer.grad_accum"} <= set(src)
    assert param_sources("train_teacher.lr", "tiny") == ["trainer.lr", "profiles.tiny.trainer.lr"]
    assert param_sources("text.template", "tiny") == ["text.template"]


@pytest.mark.parametrize("override, key, why", [
    ({"distill.lr": "abc"}, "distill.lr", "valid number"),
    ({"trainer.batch_size": 0}, "batch_size", "greater than or equal to 1"),
    ({"folds.n_folds": 1}, "folds.n_folds", "greater than or equal to 2"),
    ({"folds.n_folds": 0}, "folds.n_folds", "greater than or equal to 2"),
    ({"folds": 3}, "folds", "valid dictionary"),
    ({"ensemble.method": "avg"}, "ensemble.method", "'mean', 'exact' or 'weighted'"),
    ({"folds.use": [0, 7]}, "folds.use", "outside 0..2"),
    ({"models.teachers": ["llama", "mistral"]}, "models", "'mistral'"),
    ({"orchestration.slurm.walltime": "2h"}, "walltime", "[D-]HH:MM:SS"),
    ({"infer.packed": "sometimes"}, "infer.packed", "'auto'"),
    ({"infer.pack_tokens": 256}, "infer.pack_tokens", "shorter than the longest row"),
    ({"infer.verified_capabilities": ["H100"]}, "infer.verified_capabilities", "compute capabilities"),
    ({"orchestration.runner": "gpus"}, "orchestration.runner", "'local-gpus'"),
    ({"orchestration.local_gpus": "all"}, "orchestration.local_gpus", "'auto'"),
])
def test_a_value_the_schema_refuses_names_its_key(override, key, why):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    assert key in str(e.value) and why in str(e.value)


def test_numbers_written_as_yaml_strings_are_read_as_numbers():
    from lmsys.config import parse_override
    key, value = parse_override("distill.lr=1e-3")          # YAML 1.1 reads 1e-3 (no dot) as a string
    assert value == "1e-3" and load_config("tiny", {key: value})["distill"]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("content, why", [
    (b"- a\n- b\n", "must be a mapping of sections"),
    (b"", "an empty file"),
    (b"just a string\n", "must be a mapping of sections"),
    (b"\x00\x01\xff\xfe binary", "not"),
    (b"data: [unclosed\n", "not YAML"),
])
def test_a_params_file_that_is_not_a_mapping(tmp_path, content, why):
    p = tmp_path / "params.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=why.replace("[", r"\[")):
        load_config("tiny", params_path=p)


def test_a_params_file_missing_a_section_names_it(tmp_path):
    p = params_copy(tmp_path, lambda raw: raw.pop("calibrate"))
    with pytest.raises(ConfigError, match="calibrate: missing"):
        load_config("tiny", params_path=p)
    q = params_copy(tmp_path, lambda raw: raw["folds"].__setitem__("n_fold", 3))
    with pytest.raises(ConfigError, match="folds.n_fold: unknown key"):
        load_config("tiny", params_path=q)


def test_unknown_profile_and_key():
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="unknown config key 'train_teacher.lrr'"):
        load_config("tiny", {"train_teacher.lrr": 1})


def test_a_step_sees_only_what_it_declares():
    cfg = {**load_config("tiny"), "root": "/r"}
    view = for_step(cfg, ("folds.n_folds", "text", "seed"))
    assert view["folds"]["n_folds"] == 3 and view["text"]["template"] and view["seed"] == 2025
    assert view["profile"] == "tiny" and view["root"] == "/r"                 # free keys
    for read in (lambda: view["distill"], lambda: view.get("distill"), lambda: view["folds"]["use"],
                 lambda: view["folds"].get("use", None)):
        with pytest.raises(UndeclaredKey, match="does not declare"):
            read()
    assert json.loads(json.dumps(view))["folds"] == {"n_folds": 3}           # serialises as the plain view


def test_an_override_replaces_the_value_at_its_key():
    """`--set models.specs.gemma={...}` is that spec (no key of the old one kept); `{}` empties a mapping."""
    spec = {"kind": "tiny-gemma2", "hidden": 32, "layers": 1, "heads": 2}
    cfg = load_config("full", {"models.specs.gemma": spec, "orchestration.step_gpus": {}})
    assert cfg["models"]["specs"]["gemma"] == spec and cfg["orchestration"]["step_gpus"] == {}
    assert load_config("full")["orchestration"]["step_gpus"]                 # the profile's, without the override
