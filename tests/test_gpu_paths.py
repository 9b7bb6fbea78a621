"""The CUDA code paths of the full profile, checked on the CPU where the logic allows (issue 9):

- fold merging puts the adapter tensors on the base weight's device and dtype (merged in fp32), shown
  with a base on the 'meta' device (the CPU-read adapter tensors would raise there as on cuda) and
  in bf16;
- every trainable parameter (LoRA and the modules_to_save head copy) is fp32 on a bf16 base, and a
  training step moves the head;
- weights load through device_map straight onto the target device (student, merged model, GPTQ
  reference).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, Gemma2Config

from lmsys.ensemble import ensemble_adapters, merge_into, read_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICES = ["cpu", "meta", *(["cuda"] if torch.cuda.is_available() else [])]
GEMMA = {"kind": "tiny-gemma2", "hidden": 64, "layers": 2, "heads": 4, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def _config():
    return Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=16, vocab_size=300, num_labels=3, pad_token_id=0)


def _base(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(_config(), dtype=dtype).eval()


@pytest.fixture(scope="module")
def fold_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    dirs = []
    for k in range(2):
        torch.manual_seed(10 + k)
        pm = get_peft_model(_base(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=TARGETS,
                                                init_lora_weights=False))
        with torch.no_grad():
            pm.base_model.model.score.modules_to_save["default"].weight.add_(torch.randn(3, 64))
        pm.save_pretrained(root / f"fold{k}")
        dirs.append(root / f"fold{k}")
    return dirs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["mean", "exact"])
def test_merge_runs_on_the_base_weights_device(fold_dirs, device, method):
    """CPU-read adapters merged into a bf16 base on `device`: every tensor stays on that device in
    bf16 (on 'meta' the old `cpu + meta` sum raised, as `cpu + cuda` does on a GPU)."""
    folds = [read_adapter(d)[:2] for d in fold_dirs]
    assert all(t.device.type == "cpu" for lora, _ in folds for a, b, _ in lora.values() for t in (a, b))
    model = _base(device, torch.bfloat16)
    merge_into(model, folds, np.full(2, 0.5), method)
    for name, t in model.state_dict().items():
        assert t.device.type == device and t.dtype == torch.bfloat16, name


def test_bf16_merge_is_the_fp32_merge_rounded_once(fold_dirs, tmp_path):
    """Merging into a bf16 base equals merging into that base upcast to fp32 and casting the result:
    the sum is done in fp32 and rounded once."""
    fp32 = ensemble_adapters(lambda: _base(dtype=torch.bfloat16).float(), fold_dirs, tmp_path / "fp32", "exact")
    bf16 = ensemble_adapters(lambda: _base(dtype=torch.bfloat16), fold_dirs, tmp_path / "bf16", "exact")
    want = AutoModelForSequenceClassification.from_pretrained(str(fp32)).state_dict()
    got = AutoModelForSequenceClassification.from_pretrained(str(bf16), dtype=torch.bfloat16).state_dict()
    base = _base(dtype=torch.bfloat16).float().state_dict()
    changed = 0
    for k, v in want.items():
        assert torch.equal(got[k], v.to(torch.bfloat16)), k
        changed += not torch.equal(v, base[k])
    assert changed >= 2 * 7 + 1          # every adapted projection of both layers and the head moved


# ---------------------------------------------------------------- fp32 trainable parameters

def _batch(tok, n=8):
    from train_worker import make_task
    ids, labels = make_task(n, len(tok), seed=5)
    from lmsys.infer import pad_batch
    x, mask = pad_batch(ids, tok.pad_token_id)
    return x, mask, torch.as_tensor(labels)


def _head(model) -> torch.Tensor:
    return model.base_model.model.score.modules_to_save["default"].weight


def test_bf16_student_trains_fp32_params_and_moves_the_head(tok, tmp_path):
    """Tiny Gemma-2 student built in bf16 with gradient checkpointing (the full profile's student):
    every requires_grad parameter (LoRA and the score head copy) is fp32, the frozen base stays bf16,
    and one AdamW step at the full profile's lr 5e-5 changes every head weight (in bf16 most such
    updates round to nothing). Saved and rebuilt from the adapter, the fp32 head comes back exactly."""
    from lmsys.models import build_model
    spec = {**GEMMA, "gradient_checkpointing": True}
    model = build_model(spec, tok, dtype=torch.bfloat16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert {n: p.dtype for n, p in trainable.items() if p.dtype != torch.float32} == {}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    model.train()
    before = _head(model).detach().clone()
    x, mask, y = _batch(tok)
    logits = model(input_ids=x, attention_mask=mask).logits
    assert logits.dtype == torch.float32                       # the head computes in fp32
    torch.nn.functional.cross_entropy(logits, y).backward()
    opt = torch.optim.AdamW(trainable.values(), lr=5e-5)
    opt.step()
    after = _head(model).detach()
    assert after.dtype == torch.float32 and bool((after != before).all())
    # the same update in bf16 would leave most weights where they were: what fp32 buys
    rounded = (after.to(torch.bfloat16) != before.to(torch.bfloat16)).float().mean().item()
    print(f"head weights that a bf16 copy would see move: {rounded:.1%}")
    assert rounded < 0.9
    model.save_pretrained(tmp_path / "adapter")
    again = build_model(spec, tok, init_adapter=tmp_path / "adapter", dtype=torch.bfloat16)
    assert _head(again).dtype == torch.float32 and torch.equal(_head(again).detach(), after)
    assert all(p.dtype == torch.float32 for p in again.parameters() if p.requires_grad)


def test_fp32_build_is_unchanged(tok):
    """On the CPU (fp32) nothing is cast and no hook is added: the tiny pipeline's path is as before."""
    from lmsys.models import build_model, upcast_trainable
    model = build_model(GEMMA, tok)
    assert upcast_trainable(model) == 0
    assert not model.base_model.model.score.modules_to_save["default"]._forward_pre_hooks


# ---------------------------------------------------------------- loading straight onto the device

@pytest.fixture(scope="module")
def saved_student(tok, tmp_path_factory):
    """A tiny Gemma-2 classifier saved as a model dir (stands in for a hub checkpoint / merged model)."""
    from lmsys.models import build_base_model
    d = tmp_path_factory.mktemp("student")
    build_base_model(GEMMA, tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_student_merge_and_gptq_reference_load_straight_onto_the_device(saved_student, tok, monkeypatch):
    """The student base (pretrained kind), the merged model (load_for_inference) and GPTQ's
    unquantised reference are read with device_map={'': device}: each weight lands on the device as it
    is read, with no whole host copy moved afterwards. Shown with the 'meta' device: every tensor ends
    there and no Module.to() call moved it. On the CPU the same path loads the real weights."""
    from lmsys.models import build_base_model, load_for_inference
    from lmsys.quantize import _load_reference
    moves = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(a or k) or real_to(self, *a, **k))
    spec = {"kind": "pretrained", "path": str(saved_student), "lora": GEMMA["lora"]}
    loaded = [build_base_model(spec, tok, device="meta", dtype=torch.bfloat16),
              load_for_inference(saved_student, {}, tok, device="meta", dtype=torch.bfloat16),
              _load_reference(saved_student, torch.device("meta"))]
    assert moves == []
    for m in loaded:
        assert {t.device.type for t in m.state_dict().values()} == {"meta"}
    monkeypatch.undo()
    want = build_base_model(GEMMA, tok).state_dict()
    for m in (build_base_model(spec, tok), load_for_inference(saved_student, {}, tok), _load_reference(saved_student, "cpu")):
        assert all(torch.equal(v, want[k]) for k, v in m.state_dict().items())


def test_random_init_kind_builds_real_architectures_once(tok, tmp_path, monkeypatch):
    """kind random-init: a real architecture's config (here Gemma-2 with its soft-capping, sliding
    window and head_dim 256 defaults, and Qwen2) with a vocab larger than the tokenizer, written once to
    the model cache and then loaded as a pretrained checkpoint (device_map); rebuilt identically."""
    from lmsys.models import build_base_model, build_model, load_tokenizer, random_init_dir
    monkeypatch.setenv("LMSYS_MODEL_CACHE", str(tmp_path / "cache"))
    gemma = {"kind": "random-init", "arch": "gemma2", "lora": GEMMA["lora"],
             "config": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "sliding_window": 16}}
    assert load_tokenizer(gemma, tok.name_or_path).vocab_size == tok.vocab_size
    a = build_base_model(gemma, tok)
    c = a.config
    assert (c.model_type, c.vocab_size, c.head_dim, c.attn_logit_softcapping, c.final_logit_softcapping,
            c.sliding_window, c.num_labels) == ("gemma2", 4096, 256, 50.0, 30.0, 16, 3)
    assert c.pad_token_id == tok.pad_token_id
    assert len(list((tmp_path / "cache").iterdir())) == 1
    b = build_base_model(gemma, tok)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    qwen = {"kind": "random-init", "arch": "qwen2", "config": {"vocab_size": 512, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}}
    model = build_model(qwen, tok)
    assert model.base_model.model.config.model_type == "qwen2" and len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(ValueError, match="vocab_size 100 < the tokenizer"):
        random_init_dir({**qwen, "config": {**qwen["config"], "vocab_size": 100}}, 0, len(tok))
    with pytest.raises(ValueError, match="arch in"):
        random_init_dir({**qwen, "arch": "mistral"}, 0, len(tok))
