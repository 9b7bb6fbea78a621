"""Serving where the competition serves (issue 20), on the CPU, with the target's compute capability,
the compilers and the GPUs patched where the logic needs a card this machine does not have:

- the served dtype comes from the target (serve.cards / serve.dtype; 7.5 -> float16, 8.0 -> bfloat16),
  and the merge casts every tensor to it once: the fp32-trained head is rounded once, not twice;
- the non-finite guard: a float16 overflow (a scaled norm weight) is caught, counted and recomputed
  in float32, or fails with the fix; nothing non-finite comes back;
- the GPTQ kernel per device, nothing compiled in a step, and `lmsys check`'s report on a machine
  without nvcc; Marlin only where `--build-kernels` recorded it;
- predict's units: every device a run of whole batches, the recipe's one order per T4 on 2 GPUs.
The pipeline-level checks (merge, quantize and predict steps in fp16/bf16, two worker processes, the
exported bundle in a fresh virtualenv) are in tests/test_pipeline_tiny.py, on its shared run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, Gemma2Config

from lmsys import cards, kernels, target
from lmsys.config import load_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- the served dtype

@pytest.mark.parametrize("cards, dtype", [("2xT4", "float16"), ("T4", "float16"), ("1xP100", "float16"),
                                          ("1xA100", "bfloat16"), ("8xH200", "bfloat16"), ("1xL4", "bfloat16")])
def test_served_dtype_follows_the_cards(cards, dtype):
    t = target.serving_target(load_config("tiny", {"serve.cards": cards}))
    assert (t.dtype, t.cards, t.count) == (dtype, cards, int(cards.split("x")[0]) if "x" in cards else 1)
    assert ("< 8.0" in t.why) == (dtype == "float16"), t.why


@pytest.mark.parametrize("capability, dtype", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16"),
                                               (None, "float32")])
def test_without_cards_the_device_the_step_runs_on_decides(monkeypatch, capability, dtype):
    monkeypatch.setattr(target, "device_capability", lambda device=None: capability)
    assert target.serving_target(load_config("tiny")).dtype == dtype


def test_full_profile_serves_on_two_t4_in_float16_and_bad_targets_are_refused():
    assert target.serving_target(load_config("full")).dtype == "float16"
    with pytest.raises(ValueError, match="no bf16 tensor cores.*serve.dtype auto or float16"):
        target.serving_target(load_config("tiny", {"serve.cards": "2xT4", "serve.dtype": "bfloat16"}))
    with pytest.raises(ValueError, match="unknown card 'K80'.*known: P100"):
        cards.parse_cards("2xK80")
    with pytest.raises(ValueError, match="expected N x CARD"):
        cards.parse_cards("two T4")
    assert target.serving_target(load_config("tiny", {"serve.cards": "1xA100", "serve.dtype": "float16"})).dtype == "float16"


# ---------------------------------------------------------------- the merge: one cast

def _config():
    return Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=16, vocab_size=300, num_labels=3, pad_token_id=0)


def _base(dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(_config(), dtype=dtype).eval()


@pytest.fixture(scope="module")
def fold_dirs(tmp_path_factory):
    """Two fold adapters of a tiny Gemma-2 whose fp32 heads are far from any bf16 or fp16 value."""
    root = tmp_path_factory.mktemp("serve-folds")
    dirs = []
    for k in range(2):
        torch.manual_seed(10 + k)
        pm = get_peft_model(_base(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=TARGETS,
                                                init_lora_weights=False))
        with torch.no_grad():
            pm.base_model.model.score.modules_to_save["default"].weight.add_(torch.randn(3, 64) / 3)
        pm.save_pretrained(root / f"fold{k}")
        dirs.append(root / f"fold{k}")
    return dirs


def test_served_head_is_the_fp32_average_cast_once(fold_dirs, tmp_path):
    """Merged for a T4 (float16): the saved head is the fp32 mean of the fold heads rounded once to float16,
    and every merged weight is (fp32 base + fp32 delta) rounded once. The old path (the head copied into a
    bf16 base, then served in float16) rounds the head twice, and loses bits of it."""
    from lmsys.ensemble import ensemble_adapters, read_adapter
    sidecar = target.record(target.serving_target(load_config("tiny", {"serve.cards": "2xT4"})))
    out = ensemble_adapters(_base, fold_dirs, tmp_path / "fp16", "exact", dtype=torch.float16,
                            sidecars={target.RECORD: sidecar})
    fp32 = ensemble_adapters(_base, fold_dirs, tmp_path / "fp32", "exact")
    got = AutoModelForSequenceClassification.from_pretrained(str(out), dtype="auto").state_dict()
    want32 = AutoModelForSequenceClassification.from_pretrained(str(fp32)).state_dict()
    assert {v.dtype for v in got.values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert target.head_dtype(out) == "float16" and target.read_record(out)["dtype"] == "float16"
    for k, v in want32.items():
        assert torch.equal(got[k], v.to(torch.float16)), k              # one rounding, from fp32
    heads = [read_adapter(d)[1]["score.weight"] for d in fold_dirs]
    mean = (heads[0] * 0.5 + heads[1] * 0.5)
    assert torch.equal(got["score.weight"], mean.to(torch.float16))
    twice = mean.to(torch.bfloat16).to(torch.float16)                   # what a bf16 base then fp16 serving gave
    lost = (twice != got["score.weight"]).float().mean().item()
    print(f"head weights a bf16 base would have rounded twice (differing in float16): {lost:.0%}")
    assert lost > 0.5


def test_merge_from_a_bf16_base_casts_each_tensor_once(fold_dirs, tmp_path):
    """A bf16 base (the GPU's training dtype) merged for float16: merged weights are (bf16 base as fp32 +
    delta) rounded once; untouched tensors are the bf16 values, exactly representable in float16."""
    from lmsys.ensemble import ensemble_adapters
    out = ensemble_adapters(lambda: _base(torch.bfloat16), fold_dirs, tmp_path / "m", "exact", dtype=torch.float16)
    upcast = ensemble_adapters(lambda: _base(torch.bfloat16).float(), fold_dirs, tmp_path / "u", "exact")
    got = AutoModelForSequenceClassification.from_pretrained(str(out), dtype="auto").state_dict()
    want = AutoModelForSequenceClassification.from_pretrained(str(upcast)).state_dict()
    base = _base(torch.bfloat16).state_dict()
    for k, v in want.items():
        assert got[k].dtype == torch.float16 and torch.equal(got[k], v.to(torch.float16)), k
    assert torch.equal(got["model.norm.weight"].float(), base["model.norm.weight"].float())


# ---------------------------------------------------------------- reload checks

def _saved(tmp_path, tok, dtype: str, scale_norm: float = 1.0):
    """A tiny Gemma-2 classifier saved in `dtype` with its serving.json; the first layer's post-feed-forward
    norm scales by `scale_norm` (Gemma's norms multiply by 1 + weight): large values overflow the residual
    stream in float16, as Gemma's activations are known to."""
    d = tmp_path / f"model-{dtype}-{scale_norm:g}"
    model = _base()
    with torch.no_grad():
        model.model.layers[0].post_feedforward_layernorm.weight.fill_(scale_norm - 1)
    model.to(target.torch_dtype(dtype)).save_pretrained(d)
    tok.save_pretrained(d)
    (d / target.RECORD).write_text(json.dumps({"cards": None, "count": 1, "capability": None, "dtype": dtype,
                                               "why": "test"}))
    return d


def test_reload_checks_the_record_and_casts_bf16_on_a_t4(tmp_path, tok):
    d = _saved(tmp_path, tok, "bfloat16")
    assert target.load_dtype(d, (8, 0)) == ("bfloat16", None)
    assert target.load_dtype(d, None) == ("bfloat16", None)                 # a CPU runs it
    dtype, warning = target.load_dtype(d, (7, 5))
    assert dtype == "float16" and "no bf16 tensor cores: loaded in float16" in warning
    rec = json.loads((d / target.RECORD).read_text())
    (d / target.RECORD).write_text(json.dumps({**rec, "dtype": "float16"}))
    with pytest.raises(ValueError, match="serving.json records float16 but config.json says bfloat16"):
        target.load_dtype(d, (7, 5))
    (d / target.RECORD).unlink()
    with pytest.raises(FileNotFoundError, match="rerun step 6"):
        target.load_dtype(d, None)


# ---------------------------------------------------------------- the non-finite guard

def _rows(tok, n=12):
    from train_worker import make_task
    return make_task(n, 300, seed=2)[0]


def test_fp16_overflow_is_caught_counted_and_recomputed_in_fp32(tmp_path, tok):
    """A norm weight of 6e4 (a float16 value): the residual stream overflows float16 (65504 is its largest
    value), not float32. The guard counts every row, recomputes them one at a time in float32 and returns exactly
    the float32 model's logits; without an fp32 model it fails with the fix; nothing non-finite returns."""
    from lmsys.infer import NonFiniteLogits, predict_logits, predict_logits_guarded
    from lmsys.steps.serve import load_model
    d = _saved(tmp_path, tok, "float16", scale_norm=6e4)
    rows = _rows(tok)
    model, fp32_model, info = load_model(d, "cpu")
    assert info["dtype"] == "float16" and next(model.parameters()).dtype == torch.float16
    assert not np.isfinite(predict_logits(model, rows, 0, 4)).all(axis=1).any()          # it does overflow
    z, guard = predict_logits_guarded(model, rows, 0, 4, fp32_model=fp32_model)
    assert guard == {"nonfinite_rows": len(rows), "recomputed_fp32": len(rows)} and np.isfinite(z).all()
    m32 = load_model(d, "cpu", dtype="float32")[0]
    want = np.concatenate([predict_logits(m32, [r], 0, 1) for r in rows])
    assert np.array_equal(z, want)
    with pytest.raises(NonFiniteLogits, match=r"12 of 12 rows give non-finite logits in float16.*fix: serve.nonfinite"):
        predict_logits_guarded(model, rows, 0, 4)
    model, fp32_model, _ = load_model(d, "cpu", nonfinite="fail")
    assert fp32_model is None


def test_guard_fails_when_float32_overflows_too(tmp_path, tok):
    """An infinite norm weight: non-finite in float32 as well, so the guard fails, saying so."""
    from lmsys.infer import NonFiniteLogits, predict_logits_guarded
    from lmsys.steps.serve import load_model
    d = _saved(tmp_path, tok, "float16", scale_norm=float("inf"))
    model, fp32_model, _ = load_model(d, "cpu")
    with pytest.raises(NonFiniteLogits, match="in float32 too.*weights are broken"):
        predict_logits_guarded(model, _rows(tok), 0, 4, fp32_model=fp32_model)


def test_fp16_logits_of_a_sane_model_need_no_guard(tmp_path, tok):
    from lmsys.infer import predict_logits, predict_logits_guarded
    from lmsys.steps.serve import load_model
    d = _saved(tmp_path, tok, "float16")
    model, fp32_model, _ = load_model(d, "cpu")
    z, guard = predict_logits_guarded(model, _rows(tok), 0, 4, fp32_model=fp32_model)
    assert guard == {"nonfinite_rows": 0, "recomputed_fp32": 0}
    assert np.array_equal(z, predict_logits(model, _rows(tok), 0, 4))


# ---------------------------------------------------------------- GPTQ kernels

@pytest.mark.parametrize("requested, capability, dtype, built, cc, triton, want", [
    ("auto", None, "float32", False, True, True, "gptq_torch"),          # a CPU
    ("auto", (7, 5), "float16", False, True, True, "gptq_triton"),       # a T4
    ("auto", (7, 5), "float16", False, False, True, "gptq_torch"),       # no C compiler for Triton's launcher
    ("auto", (7, 5), "float16", False, True, False, "gptq_torch"),       # no Triton
    ("auto", (9, 0), "bfloat16", False, True, True, "gptq_triton"),      # an H200 without a built Marlin
    ("auto", (9, 0), "bfloat16", True, True, True, "gptq_marlin"),       # ... with one (lmsys check --build-kernels)
    ("auto", (7, 5), "bfloat16", True, True, True, "gptq_triton"),       # Marlin refuses bf16 on 7.5
    ("auto", (7, 5), "float16", True, True, True, "gptq_marlin"),
    ("gptq_torch", (9, 0), "bfloat16", True, True, True, "gptq_torch"),  # explicit and runnable: as asked
])
def test_backend_choice(requested, capability, dtype, built, cc, triton, want):
    got, why = kernels.choose_backend(requested, capability, dtype, marlin_built=built, cc=cc, triton=triton)
    assert got == want, why


@pytest.mark.parametrize("requested, capability, dtype, built, cc, match", [
    ("gptq_marlin", (9, 0), "bfloat16", False, True, "compile it with nvcc inside the step.*fix: run `lmsys check --build-kernels`"),
    ("gptq_marlin", (7, 5), "bfloat16", True, True, "refuses bfloat16 on compute capability 7.5"),
    ("gptq_triton", None, "float32", False, True, "needs a CUDA device"),
    ("gptq_triton", (7, 5), "float16", False, False, "needs a C compiler.*fix: install it, or quantize.backend gptq_torch"),
])
def test_backend_refusals_name_the_fix(requested, capability, dtype, built, cc, match):
    with pytest.raises(kernels.KernelError, match=match):
        kernels.choose_backend(requested, capability, dtype, marlin_built=built, cc=cc, triton=True)


def test_forbid_builds_keeps_an_explicit_setting(monkeypatch):
    """gptqmodel's compiled helpers switched to their Python fallbacks, unless the environment says
    otherwise (a machine that prebuilt them). That no step builds one: tests/test_pipeline_tiny.py."""
    import os
    for k in kernels.NO_BUILD_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "0")
    kernels.forbid_builds()
    assert os.environ["GPTQMODEL_DISABLE_GPTQ_CUDA"] == "1" and os.environ["GPTQMODEL_DISABLE_PACK_EXT"] == "0"


def _no_nvcc(monkeypatch, capability, cc=True):
    import shutil
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "nvcc" or (name in ("cc", "gcc") and not cc)
                        else real(name, *a, **k))
    monkeypatch.setattr(target, "device_capability", lambda device=None: capability)
    monkeypatch.setattr(kernels, "has_triton", lambda: True)


def test_check_reports_the_kernel_and_fails_without_nvcc(monkeypatch, tmp_path):
    """`lmsys check` on an H200 without nvcc: Marlin asked for -> FAIL with the fix; auto -> Triton here and
    on the 2xT4 target; without a C compiler either -> the torch kernel (nothing to compile)."""
    from lmsys.check import format_table, gptq_kernel_checks
    monkeypatch.setenv("LMSYS_KERNEL_RECORD", str(tmp_path / "kernels.json"))
    _no_nvcc(monkeypatch, (9, 0))
    lines = gptq_kernel_checks(load_config("full", {"quantize.backend": "gptq_marlin"}))
    assert [(c.check, c.status) for c in lines] == [("quantize: GPTQ kernel here", "FAIL"),
                                                      ("serve: GPTQ kernel on 2xT4", "FAIL")]
    table = format_table(lines)
    assert "fix: run `lmsys check --build-kernels`" in table and "compile it with nvcc inside the step" in table
    lines = gptq_kernel_checks(load_config("full"))
    assert [(c.status, c.detail.split(":")[0]) for c in lines] == [("ok", "gptq_triton"), ("ok", "gptq_triton in float16")]
    assert "GPTQMODEL_DISABLE_GPTQ_CUDA=1" in lines[0].detail
    _no_nvcc(monkeypatch, (7, 5), cc=False)
    assert gptq_kernel_checks(load_config("full"))[0].detail.startswith("gptq_torch: the torch kernel: a C compiler")


def test_build_kernels_without_nvcc_or_gpu(monkeypatch, capsys, tmp_path):
    """`lmsys check --build-kernels`: on a GPU node without nvcc it fails (exit 2) with the fix and
    records nothing; on a CPU there is nothing to build."""
    from lmsys.cli import main
    monkeypatch.setenv("LMSYS_KERNEL_RECORD", str(tmp_path / "kernels.json"))
    _no_nvcc(monkeypatch, (9, 0))
    assert main(["check", "--build-kernels"]) == 2
    out = capsys.readouterr().out
    assert "FAIL  build kernels: Marlin builds with nvcc, which is not on PATH" in out and "fix: install the CUDA" in out
    assert not (tmp_path / "kernels.json").exists()
    monkeypatch.setattr(target, "device_capability", lambda device=None: None)
    assert kernels.build_marlin()[0] == "skip"


def test_marlin_counts_as_built_only_as_recorded(monkeypatch, tmp_path):
    """marlin_ready: the record of `--build-kernels` for this gptqmodel/torch/CUDA and card, with its
    libraries still on disk."""
    monkeypatch.setenv("LMSYS_KERNEL_RECORD", str(tmp_path / "kernels.json"))
    lib = tmp_path / "marlin_fp16.so"
    lib.write_bytes(b"\0")
    assert not kernels.marlin_ready((9, 0))
    (tmp_path / "kernels.json").write_text(json.dumps({"gptq_marlin": {
        **kernels._stack(), "capabilities": [[9, 0]], "libraries": [str(lib)], "seconds": 300.0}}))
    assert kernels.marlin_ready((9, 0)) and not kernels.marlin_ready((8, 0))
    lib.unlink()
    assert not kernels.marlin_ready((9, 0))


# ---------------------------------------------------------------- predict's units

def test_devices_setting():
    from lmsys.predict_workers import devices
    assert devices("auto", cuda_count=0) == ["cpu"] and devices("auto", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert devices(2, cuda_count=0) == ["cpu", "cpu"] and devices(1, cuda_count=2) == ["cuda:0"]
    with pytest.raises(ValueError, match="only 2 GPU"):
        devices(3, cuda_count=2)
    with pytest.raises(ValueError, match=">= 1"):
        devices(0, cuda_count=0)


@pytest.mark.parametrize("n_devices, orders", [(1, 2), (2, 2), (2, 1), (3, 2), (4, 1), (5, 1)])
def test_units_are_whole_batches_covering_every_row_once(n_devices, orders):
    from lmsys.predict_workers import plan_units, sorted_rows
    rng = np.random.default_rng(n_devices)
    ids = {o: [[1] * int(n) for n in rng.integers(1, 50, size=37)] for o in ("original", "swapped")[:orders]}
    per_device = plan_units(ids, n_devices, batch_size=4)
    assert len(per_device) == n_devices
    for o, rows in ids.items():
        units = sorted((u for us in per_device for u in us if u.order == o), key=lambda u: u.start)
        assert units[0].start == 0 and units[-1].stop == len(rows)
        assert all(a.stop == b.start for a, b in zip(units, units[1:]))
        assert all(u.start % 4 == 0 for u in units)                       # each unit starts a batch
        assert sorted(np.concatenate([sorted_rows(rows)[u.start:u.stop] for u in units])) == list(range(len(rows)))
    if n_devices == 2 and orders == 2:                                     # the recipe's 2xT4 split
        assert [[u.order for u in us] for us in per_device] == [["original"], ["swapped"]]
        assert all(u.start == 0 and u.stop == 37 for us in per_device for u in us)
