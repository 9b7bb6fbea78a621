"""Fold-LoRA ensembling on a tiny classifier: `exact` equals the mean of the individually merged
models, `weighted` their weighted mean, `mean` (the recipe's) differs; outputs reload."""
import json
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, Gemma2Config, LlamaConfig

from lmsys.ensemble import ensemble_adapters, fold_gain, fold_weights

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=300, num_labels=3, pad_token_id=0),
    "gemma2": lambda: Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=16, vocab_size=300, num_labels=3, pad_token_id=0),
}
K = 3


def factory(arch):
    def make():
        torch.manual_seed(0)   # the same base weights on every call, like from_pretrained
        return AutoModelForSequenceClassification.from_config(CONFIGS[arch]()).eval()
    return make


def save_folds(arch, root):
    """K adapters with random non-zero A and B and distinct score heads."""
    dirs = []
    for k in range(K):
        base = factory(arch)()
        torch.manual_seed(100 + k)   # after the factory, which reseeds
        cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        pm = get_peft_model(base, cfg)
        with torch.no_grad():
            pm.base_model.model.score.modules_to_save["default"].weight.add_(torch.randn(3, 64))
        pm.save_pretrained(root / f"fold{k}")
        dirs.append(root / f"fold{k}")
    return dirs


def merged_state(arch, d):
    return PeftModel.from_pretrained(factory(arch)(), d).merge_and_unload().state_dict()


def combine(states, w):
    return {k: sum(wk * s[k] for wk, s in zip(w, states)) for k in states[0]}


def assert_states_close(got, want, atol=1e-5):
    assert set(got) >= set(want) - {"lm_head.weight"}
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=atol, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def llama_folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    dirs = save_folds("llama", root)
    return dirs, [merged_state("llama", d) for d in dirs]


def test_adapters_as_expected(llama_folds):
    from safetensors.torch import load_file
    dirs, states = llama_folds
    keys = load_file(dirs[0] / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert any(k.startswith("base_model.model.score") for k in keys)
    assert not torch.equal(states[0]["score.weight"], states[1]["score.weight"])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(states[0][key], states[1][key])


def test_exact_is_mean_of_merged_models(llama_folds, tmp_path):
    dirs, states = llama_folds
    out = ensemble_adapters(factory("llama"), dirs, tmp_path / "exact", method="exact")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert_states_close(model.state_dict(), combine(states, [1 / K] * K))
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["method"] == "exact" and meta["weights"] == pytest.approx([1 / K] * K) and len(meta["folds"]) == K
    logits = model(input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_weighted_is_weighted_mean(llama_folds, tmp_path):
    dirs, states = llama_folds
    w = fold_weights([0.10, 0.30, 0.15], tau=0.1)
    assert w.sum() == pytest.approx(1) and np.all(w > 0) and w[1] > w[2] > w[0]
    out = ensemble_adapters(factory("llama"), dirs, tmp_path / "w", method="weighted", weights=w, extra={"tau": 0.1})
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert_states_close(model.state_dict(), combine(states, w))
    assert json.loads((out / "ensemble.json").read_text())["tau"] == 0.1


def test_mean_is_the_recipe_approximation(llama_folds, tmp_path):
    dirs, states = llama_folds
    out = ensemble_adapters(factory("llama"), dirs, tmp_path / "mean", method="mean")
    got = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    exact = combine(states, [1 / K] * K)
    torch.testing.assert_close(got["score.weight"], exact["score.weight"])   # full tensors: plain mean either way
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (got[key] - exact[key]).abs().max() > 1e-3                      # cross terms: not the mean of the deltas
    # ... and it is W0 + s * mean(B) @ mean(A)
    from safetensors.torch import load_file
    sds = [load_file(d / "adapter_model.safetensors") for d in dirs]
    pre = "base_model.model.model.layers.0.self_attn.q_proj."
    A = torch.stack([s[pre + "lora_A.weight"] for s in sds]).mean(0)
    B = torch.stack([s[pre + "lora_B.weight"] for s in sds]).mean(0)
    torch.testing.assert_close(got[key], factory("llama")().state_dict()[key] + 2.0 * B @ A)


def test_exact_gemma2(tmp_path):
    dirs = save_folds("gemma2", tmp_path)
    out = ensemble_adapters(factory("gemma2"), dirs, tmp_path / "exact", method="exact")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert_states_close(model.state_dict(), combine([merged_state("gemma2", d) for d in dirs], [1 / K] * K))
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_fold_weights_and_errors(llama_folds, tmp_path):
    assert np.allclose(fold_weights([0.2, 0.2, 0.2, 0.2]), 0.25)
    w = fold_weights([0.0, 1000.0], tau=0.01)           # extreme: still no fold discarded
    assert np.all(w > 0) and w.sum() == pytest.approx(1)
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ValueError):
            fold_weights(bad)
    with pytest.raises(ValueError):
        fold_weights([0.1, 0.2], tau=0)
    p = np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2]])
    assert fold_gain(p, [0, 1], [1 / 3] * 3) == pytest.approx(np.log(0.6 * 3))
    dirs, _ = llama_folds
    with pytest.raises(ValueError, match="weights"):
        ensemble_adapters(factory("llama"), dirs, tmp_path / "x", method="weighted")
    with pytest.raises(ValueError, match="unknown"):
        ensemble_adapters(factory("llama"), dirs, tmp_path / "x", method="svd")
    assert not (tmp_path / "x").exists()


def test_fold_gain_computes_in_float64_and_takes_float_labels():
    """float32 probabilities are read as float64 (the gain equals the float64 computation exactly);
    labels may come as floats (a parquet column with a missing value elsewhere reads as float64)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=50).astype(np.float32)
    y = rng.integers(0, 3, 50)
    prior = np.array([0.5, 0.3, 0.2])
    p64 = p.astype(np.float64)
    want = float(np.mean(np.log(p64[np.arange(50), y]) - np.log(prior[y])))
    assert fold_gain(p, y, prior) == want
    assert fold_gain(p, y.astype(np.float64), prior) == want


def test_fold_gain_floors_zero_probabilities_and_reads_the_baseline_in_float64():
    p = np.array([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0]])
    y = np.array([0, 1])
    base = np.array([0.0, 0.5, 0.5], dtype=np.float32)                 # a zero baseline class, float32
    want = ((np.log(1e-15) - np.log(1e-15)) + (np.log(0.5) - np.log(np.float64(np.float32(0.5))))) / 2
    assert fold_gain(p, y, base) == want
    base32 = np.array([0.3, 0.3, 0.4], dtype=np.float32)
    q = np.full((2, 3), 1 / 3)
    assert fold_gain(q, y, base32) == float(np.mean(np.log(q[[0, 1], y]) - np.log(base32.astype(np.float64)[y])))


# ---------------------------------------------------------------- small hand-made adapters (mutation testing)
# adapter folders written by hand (safetensors + adapter_config.json) and a two-module model: every
# check of read_adapter / merge_into / ensemble_adapters with its message, and the arithmetic exactly

def _write_adapter(d, tensors, **cfg):
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8, **cfg}))
    return d


class Tiny(torch.nn.Module):
    """Two 'modules' named like a model's (`lin.weight` [4, 3], `score.weight` [2, 4])."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(3, 4, bias=False).to(dtype)
        self.score = torch.nn.Linear(4, 2, bias=False).to(dtype)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(4, 3, generator=g))
            self.score.weight.copy_(torch.randn(2, 4, generator=g))
        self.saved = []

    def save_pretrained(self, d):
        torch.save(self.state_dict(), d / "weights.pt")
        self.saved.append(d)


def _fold(k, r=2):
    g = torch.Generator().manual_seed(10 + k)
    return {"base_model.model.lin.lora_A.weight": torch.randn(r, 3, generator=g),
            "base_model.model.lin.lora_B.weight": torch.randn(4, r, generator=g),
            "base_model.model.score.modules_to_save.weight": torch.randn(2, 4, generator=g),
            "base_model.model.score.original_module.weight": torch.randn(2, 4, generator=g)}


def test_read_adapter_keys_scales_and_dtypes(tmp_path):
    from lmsys.ensemble import read_adapter
    t = _fold(0)
    t["base_model.model.lin.lora_B.weight"] = t["base_model.model.lin.lora_B.weight"].half()
    lora, full, cfg = read_adapter(_write_adapter(tmp_path / "a", t, base_model_name_or_path="tiny"))
    assert set(lora) == {"lin.weight"} and set(full) == {"score.weight"} and cfg["base_model_name_or_path"] == "tiny"
    A, B, s = lora["lin.weight"]
    assert A.dtype == B.dtype == torch.float32 and s == 8 / 2
    torch.testing.assert_close(B, t["base_model.model.lin.lora_B.weight"].float())
    torch.testing.assert_close(full["score.weight"], t["base_model.model.score.modules_to_save.weight"])
    assert read_adapter(_write_adapter(tmp_path / "rs", _fold(0, r=9), use_rslora=True))[0]["lin.weight"][2] == 8 / 3.0
    assert read_adapter(_write_adapter(tmp_path / "r4", _fold(0, r=4), use_rslora=False))[0]["lin.weight"][2] == 8 / 4
    assert read_adapter(_write_adapter(tmp_path / "al", _fold(0), lora_alpha=3))[0]["lin.weight"][2] == 1.5
    plain = {"base_model.model.score.weight": torch.ones(2, 4)}
    assert set(read_adapter(_write_adapter(tmp_path / "p", plain))[1]) == {"score.weight"}
    for i, key in enumerate(("model.lin.lora_A.weight", "base_model.model.emb.lora_embedding_A",
                             "base_model.model.lin.lora_magnitude_vector")):
        d = _write_adapter(tmp_path / f"bad{i}", {key: torch.ones(2, 3)})
        with pytest.raises(ValueError, match=rf"bad{i}: unsupported adapter key '{key}'$"):
            read_adapter(d)
    d = _write_adapter(tmp_path / "half", {"base_model.model.lin.lora_A.weight": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"half: lin.weight has only \['lora_A'\]$"):
        read_adapter(d)
    d = _write_adapter(tmp_path / "halfb", {"base_model.model.lin.lora_B.weight": torch.ones(4, 2)})
    with pytest.raises(ValueError, match=r"halfb: lin.weight has only \['lora_B'\]$"):
        read_adapter(d)


@pytest.mark.parametrize("cfg, names", [
    ({"peft_type": "IA3"}, "['peft_type']"), ({"use_dora": True}, "['use_dora']"), ({"lora_bias": True}, "['lora_bias']"),
    ({"fan_in_fan_out": True}, "['fan_in_fan_out']"), ({"alpha_pattern": {"x": 2}}, "['alpha_pattern']"),
    ({"bias": "all"}, "['bias']"), ({"trainable_token_indices": [1]}, "['trainable_token_indices']"),
    ({"use_dora": True, "bias": "lora_only"}, "['use_dora', 'bias']")])
def test_unsupported_adapter_settings_named(tmp_path, cfg, names):
    from lmsys.ensemble import read_adapter
    d = _write_adapter(tmp_path / "a", _fold(0), **cfg)
    with pytest.raises(ValueError, match=rf"a: unsupported adapter settings {re.escape(names)}$"):
        read_adapter(d)


def test_supported_settings_pass(tmp_path):
    from lmsys.ensemble import _check_config
    _check_config({}, "x")
    _check_config({"peft_type": "LORA", "use_dora": False, "lora_bias": False, "fan_in_fan_out": False,
                   "alpha_pattern": {}, "bias": "none", "trainable_token_indices": None}, "x")


def test_merge_arithmetic_each_method(tmp_path):
    from lmsys.ensemble import merge_into, read_adapter
    folds = [read_adapter(_write_adapter(tmp_path / f"f{k}", _fold(k)))[:2] for k in range(3)]
    A = [f[0]["lin.weight"][0] for f in folds]
    B = [f[0]["lin.weight"][1] for f in folds]
    S = [f[1]["score.weight"] for f in folds]
    base = Tiny()
    W0, S0 = base.lin.weight.detach().clone(), base.score.weight.detach().clone()
    w = np.array([0.2, 0.3, 0.5])
    for method, want in [
            ("exact", W0 + sum(4.0 * b @ a for a, b in zip(A, B)) / 3),
            ("weighted", W0 + sum(float(wk) * 4.0 * b @ a for wk, a, b in zip(w, A, B))),
            ("mean", W0 + 4.0 * (sum(B) / 3) @ (sum(A) / 3))]:
        m = Tiny()
        ww = w if method == "weighted" else np.full(3, 1 / 3)
        merge_into(m, folds, ww, method)
        torch.testing.assert_close(m.lin.weight, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.score.weight, sum(float(wk) * s for wk, s in zip(ww, S)), rtol=1e-6, atol=1e-7)
    assert torch.equal(base.score.weight, S0)
    m = Tiny(torch.bfloat16)                                 # bf16 base: merged in float32, cast back once
    W0b = m.lin.weight.detach().clone()
    merge_into(m, folds, np.full(3, 1 / 3), "exact")
    assert m.lin.weight.dtype == torch.bfloat16 and m.score.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m.lin.weight, (W0b.float() + sum(4.0 * b @ a for a, b in zip(A, B)) / 3).bfloat16())


def test_merge_reads_half_precision_adapters_in_float32(tmp_path):
    """Adapter tensors given in float16 are merged in float32 (as read_adapter's are)."""
    from lmsys.ensemble import merge_into
    g = torch.Generator().manual_seed(3)
    A, B, S = torch.randn(2, 3, generator=g).half(), torch.randn(4, 2, generator=g).half(), torch.randn(2, 4, generator=g)
    m = Tiny()
    W0 = m.lin.weight.detach().clone()
    merge_into(m, [({"lin.weight": (A, B, 4.0)}, {"score.weight": S})], np.ones(1), "exact")
    torch.testing.assert_close(m.lin.weight, W0 + 4.0 * B.float() @ A.float(), rtol=1e-6, atol=1e-6)


def test_merge_checks_named(tmp_path):
    from lmsys.ensemble import _delta, merge_into, read_adapter
    f0 = read_adapter(_write_adapter(tmp_path / "f0", _fold(0)))[:2]
    f1 = read_adapter(_write_adapter(tmp_path / "f1", _fold(1)))[:2]
    other = ({"other.weight": f1[0]["lin.weight"]}, f1[1])
    with pytest.raises(ValueError, match=r"^fold 1 adapts other modules than fold 0: \['lin.weight', 'other.weight'\]$"):
        merge_into(Tiny(), [f0, other], np.full(2, 0.5), "exact")
    nofull = (f1[0], {})
    with pytest.raises(ValueError, match=r"^fold 2 adapts other modules than fold 0: \['score.weight'\]$"):
        merge_into(Tiny(), [f0, f1, nofull], np.full(3, 1 / 3), "exact")
    with pytest.raises(ValueError, match=r"^adapter module 'other.weight' not in the base model$"):
        merge_into(Tiny(), [other], np.ones(1), "exact")
    wide = ({"lin.weight": (torch.ones(2, 5), torch.ones(4, 2), 1.0)}, f0[1])
    with pytest.raises(ValueError, match=r"^lin.weight: delta \(4, 5\) vs base \(4, 3\)$"):
        merge_into(Tiny(), [wide], np.ones(1), "exact")
    for full in ({"score.weight": torch.ones(3, 4)}, {"head.weight": torch.ones(2, 4)}):
        key, shape = next(iter(full)), tuple(next(iter(full.values())).shape)
        with pytest.raises(ValueError, match=rf"^adapter tensor '{key}' \({shape[0]}, {shape[1]}\) does not match the base model$"):
            merge_into(Tiny(), [(f0[0], full)], np.ones(1), "exact")
    s2 = [(a, b, s * 2 if i else s) for i, (a, b, s) in enumerate([f0[0]["lin.weight"], f1[0]["lin.weight"]])]
    with pytest.raises(ValueError, match=r"^method 'mean' needs equal LoRA scales across folds, got \{(4.0, 8.0|8.0, 4.0)\}$"):
        _delta(s2, np.full(2, 0.5), "mean")


def test_weights_checks_named():
    from lmsys.ensemble import _weights
    np.testing.assert_array_equal(_weights("mean", 4, None), [0.25] * 4)
    np.testing.assert_array_equal(_weights("exact", 2, None), [0.5, 0.5])
    np.testing.assert_allclose(_weights("weighted", 3, [1, 1, 2]), [0.25, 0.25, 0.5])
    w32 = np.array([0.2, 0.3, 0.7], dtype=np.float32)                  # float32 weights normalised in float64
    assert _weights("weighted", 3, w32).tolist() == (w32.astype(np.float64) / w32.astype(np.float64).sum()).tolist()
    with pytest.raises(ValueError, match=r"^unknown ensemble method 'svd'; supported: \('mean', 'exact', 'weighted'\)$"):
        _weights("svd", 2, None)
    for m in ("mean", "exact"):
        with pytest.raises(ValueError, match=rf"^method '{m}' takes no weights \(use 'weighted'\)$"):
            _weights(m, 2, [0.5, 0.5])
    for bad in (None, [1.0], [1.0, 0.0], [1.0, -1.0], [1.0, float("nan")], [1.0, float("inf")], [[1.0, 1.0]]):
        with pytest.raises(ValueError, match=rf"^method 'weighted' needs 2 positive weights \(see fold_weights\), got {re.escape(repr(bad))}$"):
            _weights("weighted", 2, bad)


def test_ensemble_adapters_output_and_metadata(tmp_path):
    dirs = [_write_adapter(tmp_path / f"f{k}", _fold(k), base_model_name_or_path="tiny-base") for k in range(2)]
    made = []

    def make():
        made.append(Tiny())
        return made[-1]

    class Tok:
        def save_pretrained(self, d):
            (d / "tokenizer.json").write_text("{}")
    out = ensemble_adapters(make, [str(d) for d in dirs], tmp_path / "out", method="weighted", weights=[1, 3],
                            extra={"tau": 0.5}, tokenizer=Tok())
    assert out == tmp_path / "out" and len(made) == 1
    assert sorted(p.name for p in out.iterdir()) == ["ensemble.json", "tokenizer.json", "weights.pt"]
    assert json.loads((out / "ensemble.json").read_text()) == {
        "method": "weighted", "weights": [0.25, 0.75], "folds": [str(d) for d in dirs], "base_model": "tiny-base",
        "lora_modules": 1, "full_tensors": ["score.weight"], "tau": 0.5}
    sd = torch.load(out / "weights.pt")
    torch.testing.assert_close(sd["score.weight"], 0.25 * _fold(0)["base_model.model.score.modules_to_save.weight"]
                               + 0.75 * _fold(1)["base_model.model.score.modules_to_save.weight"])
    one = ensemble_adapters(Tiny, dirs[:1], tmp_path / "one", method="exact")      # a single fold
    assert json.loads((one / "ensemble.json").read_text())["full_tensors"] == ["score.weight"]
    assert json.loads((one / "ensemble.json").read_text())["base_model"] == "tiny-base"
    out2 = ensemble_adapters(Tiny, dirs, tmp_path / "out2")
    assert sorted(p.name for p in out2.iterdir()) == ["ensemble.json", "weights.pt"]
    assert json.loads((out2 / "ensemble.json").read_text())["method"] == "mean"
    with pytest.raises(ValueError, match=r"^no adapter folders$"):
        ensemble_adapters(Tiny, [], tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_fold_weights_exact_and_messages():
    r = np.array([0.0, 1.0, 2.0])
    adv = (r - 1) / r.std()
    np.testing.assert_allclose(fold_weights(r), np.exp(adv) / np.exp(adv).sum(), rtol=1e-12)
    np.testing.assert_allclose(fold_weights(r, tau=2), np.exp(adv / 2) / np.exp(adv / 2).sum(), rtol=1e-12)
    np.testing.assert_allclose(fold_weights(r * 100 + 7), fold_weights(r), rtol=1e-12)      # scale-free
    w = fold_weights([0.0, 1000.0], tau=0.01)                      # exp(-200) floored at 1e-8, renormalised
    np.testing.assert_allclose(w, [1e-8 / (1 + 1e-8), 1 / (1 + 1e-8)], rtol=1e-12)
    np.testing.assert_allclose(fold_weights([0.0, 1.0], tau=0.1, floor=0.2), [0.2 / 1.2, 1 / 1.2], rtol=1e-6)
    np.testing.assert_allclose(fold_weights([0.0, 1.0, 1.0], tau=0.01, floor=0.3), [0.3 / 1.3, 0.5 / 1.3, 0.5 / 1.3])
    np.testing.assert_allclose(fold_weights([0.0, 1000.0], tau=1e-3), [1e-8 / (1 + 1e-8), 1 / (1 + 1e-8)])  # no overflow
    assert fold_weights([1e6, 1e6 + 1e-7]).tolist() == [0.5, 0.5]                       # std below 1e-12 * max |r|
    assert fold_weights([0.5]).tolist() == [1.0]
    assert fold_weights([0.0, 2e-12]).tolist() == [0.5, 0.5]                           # std exactly at the threshold
    assert fold_weights([0.0, 3e-12])[1] > 0.6                         # std 1.5e-12 > 1e-12 * max(1, |r|): ranked
    g32 = np.array([0.1, 0.35, 0.2], dtype=np.float32)                # float32 gains are computed in float64
    assert np.array_equal(fold_weights(g32), fold_weights(g32.astype(np.float64)))
    for bad in ([], [0.1, float("nan")], [0.1, float("inf")], [[0.1, 0.2]]):
        with pytest.raises(ValueError, match=rf"^gains must be a non-empty list of finite numbers, got {re.escape(repr(bad))}$"):
            fold_weights(bad)
    for tau in (0, -1.0):
        with pytest.raises(ValueError, match=rf"^tau must be > 0, got {tau}$"):
            fold_weights([0.1, 0.2], tau=tau)
    p = np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2]])
    base = np.array([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]])          # per-row baseline
    assert fold_gain(p, [0, 1], base) == pytest.approx((np.log(0.6 / 0.5) + np.log(0.6 / 0.25)) / 2, rel=1e-12)
