"""Fold-LoRA ensembling on a tiny classifier: `exact` equals the mean of the individually merged
models, `weighted` their weighted mean, `mean` (the recipe's) differs; outputs reload."""
import json

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
