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
