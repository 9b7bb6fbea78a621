"""The schema of params.yaml: one typed model per section (pydantic), the types, ranges and allowed
values of every key. lmsys.config validates every resolved configuration against `Settings` before
any step runs (a typo, a wrong type or a value out of range is an exit-2 `error:` naming the key);
the trainer takes its section as a typed object (`TrainerSettings` and the sections that extend it).

Every model forbids unknown keys. A field without a default must be in params.yaml; a default here
is the value for a key params.yaml may leave out (and the one place that value is written).
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The card table, not lmsys.target: every step validates its config, so every step's code hash holds this import.
from lmsys.cards import parse_cards


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- data

class Data(Section):
    # A table is one file or a list of files (read in order); the checks across files are lmsys.data.crosscheck.
    train: Optional[str | list[str]]          # null: the embedded demo data
    test: Optional[str | list[str]]           # "none": a run without a test set (no predict, no submission)
    external: Optional[str | list[str]]
    ut: Optional[str | list[str]]
    test_labels: Optional[str]
    allow_demo: bool


class Demo(Section):
    rows: int = Field(ge=1)
    test_rows: int = Field(ge=1)
    external_rows: int = Field(ge=0)
    ut_rows: int = Field(ge=0)
    seed: int


class Folds(Section):
    n_folds: int = Field(ge=2)                # out-of-fold scores need a training part beside each fold
    seed: int
    use: Optional[list[int]]

    @model_validator(mode="after")
    def _use_in_range(self):
        bad = [k for k in self.use or [] if not 0 <= k < self.n_folds]
        if bad:
            raise ValueError(f"folds.use {bad} outside 0..{self.n_folds - 1} (folds.n_folds={self.n_folds})")
        return self


class Text(Section):
    template: str
    prompt_words: int = Field(ge=1)
    response_words: int = Field(ge=1)
    prompt_tokens: int = Field(ge=1)
    train_max_length: int = Field(ge=8)
    infer_max_length: int = Field(ge=8)

    @field_validator("template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        missing = [p for p in ("{prompt}", "{a}", "{b}") if p not in v]
        if missing:
            raise ValueError(f"text.template lacks {', '.join(missing)}")
        return v


# ---------------------------------------------------------------- models

class Lora(Section):
    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)


class ModelSpec(Section):
    kind: Literal["tiny-llama", "tiny-qwen2", "tiny-gemma2", "random-init", "pretrained", "gguf"]
    path: Optional[str] = None                # hub name (in the local cache) or local dir
    package: Optional[str] = None             # a pip-installed model package
    hidden: Optional[int] = Field(default=None, ge=1)   # tiny kinds: the architecture
    layers: Optional[int] = Field(default=None, ge=1)
    heads: Optional[int] = Field(default=None, ge=1)
    arch: Optional[Literal["llama", "qwen2", "gemma2"]] = None    # random-init: the architecture and its config keys
    config: Optional[dict[str, Any]] = None
    quantization: Optional[Literal["nf4"]] = None
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    seed: Optional[int] = None
    lora: Optional[Lora] = None


class Models(Section):
    teachers: list[str] = Field(min_length=1)
    student: str
    specs: dict[str, ModelSpec]
    tiny_vocab: int = Field(default=1024, ge=16)   # the tiny profile's BPE vocabulary

    @model_validator(mode="after")
    def _specs_exist(self):
        missing = [m for m in [*self.teachers, self.student] if m not in self.specs]
        if missing:
            raise ValueError(f"models {missing} have no spec in models.specs (has {sorted(self.specs)})")
        return self


# ---------------------------------------------------------------- training

class TrainerSettings(Section):
    """What the trainer (lmsys.train) reads: one optimizer step is grad_accum micro-batches of
    batch_size rows; the schedule is cosine with warmup_steps of warmup over the run."""
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    max_steps: Optional[int] = Field(ge=1)            # null: the epochs decide
    eval_every: Optional[int] = Field(ge=1)           # null: one evaluation, at the end
    checkpoint_every: Optional[int] = Field(ge=1)     # null: no resumable checkpoints
    packing: bool                                     # padding-free micro-batches of at most pack_tokens tokens
    pack_tokens: int = Field(ge=8)
    weight_decay: float = Field(default=0.0, ge=0)


class PostPretrain(TrainerSettings):
    enabled: bool
    max_rows: Optional[int] = Field(ge=1)


class TrainTeacher(TrainerSettings):
    subset_size: Optional[int] = Field(ge=1)


class Distill(TrainerSettings):
    temperature: float = Field(gt=0)
    ce_weight: float = Field(ge=0)
    kl_weight: float = Field(ge=0)
    cos_weight: float = Field(ge=0)
    info_gain_weights: bool
    info_gain_baseline: Literal["ema", "prior"]
    info_gain_tau: float = Field(gt=0)
    info_gain_ema_decay: float = Field(ge=0, lt=1)


# ---------------------------------------------------------------- the other steps

class FilterArgmax(Section):
    threshold: float = Field(gt=0, le=1)


class TeacherLogits(Section):
    subset: Optional[str]                      # "start-end" rows of the training part
    batch_size: int = Field(ge=1)
    progress_every: Optional[int] = Field(ge=1)

    @field_validator("subset")
    @classmethod
    def _range(cls, v):
        if v is not None and not re.fullmatch(r"\d+-\d+", str(v)):
            raise ValueError(f"teacher_logits.subset {v!r} is not START-END (e.g. 15000-20000)")
        return v


class Calibrate(Section):
    enabled: bool
    method: Literal["vector", "temperature"]


class Ensemble(Section):
    method: Literal["mean", "exact", "weighted"]
    tau: float = Field(gt=0)


class Quantize(Section):
    enabled: bool
    bits: Literal[2, 3, 4, 8]
    group_size: int = Field(ge=-1)             # -1: one group per row (GPTQ's convention)
    n_calibration: int = Field(ge=1)
    model_seqlen: int = Field(ge=8)
    backend: Literal["auto", "gptq_triton", "gptq_torch", "gptq_marlin"]   # gptqmodel kernel (lmsys/kernels.py)


class Predict(Section):
    tta: bool
    batch_size: int = Field(ge=1)
    devices: Literal["auto"] | int             # processes: one per visible GPU (auto), or N


class Serve(Section):
    cards: Optional[str]                      # N x CARD, e.g. 2xT4; null = the device the step runs on
    dtype: Literal["auto", "float16", "bfloat16", "float32"]
    nonfinite: Literal["recompute", "fail"]

    @field_validator("cards")
    @classmethod
    def _cards(cls, v):
        if v is not None:
            parse_cards(v)
        return v


class Infer(Section):
    """How inference runs in predict, teacher-logits, filter-score and the out-of-fold pass (lmsys.infer.route)."""
    packed: bool | Literal["auto"]            # auto: packed on a verified CUDA capability, padded elsewhere
    pack_tokens: int = Field(ge=128)          # tokens in one pack (every pack this long: one kernel shape)
    verified_capabilities: list[str]          # CUDA compute capabilities ("9.0") where the packed kernels were checked

    @field_validator("verified_capabilities")
    @classmethod
    def _capabilities(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not re.fullmatch(r"\d+\.\d+", str(c))]
        if bad:
            raise ValueError(f"{bad} are not compute capabilities like \"9.0\"")
        return v


class Evaluate(Section):
    enabled: bool
    ece_bins: int = Field(ge=1)


# ---------------------------------------------------------------- orchestration

WALLTIME = re.compile(r"^(\d+-)?\d+:\d{2}:\d{2}$")


class CpuJob(Section):
    queue: Optional[str]
    walltime: Optional[str]
    memory: Optional[str]
    cores: Optional[int] = Field(ge=1)


class Slurm(Section):
    queue: str
    account: Optional[str]
    walltime: str
    memory: str
    cores: int = Field(ge=1)
    processes: int = Field(ge=1)
    gpus_per_job: int = Field(ge=0)
    cpu_job: Optional[CpuJob]
    interface: Optional[str]
    min_jobs: int = Field(ge=0)
    max_jobs: int = Field(ge=0)
    cpu_jobs: int = Field(ge=0)
    prologue: list[str]
    worker_wait_s: int = Field(ge=0)

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        if not WALLTIME.match(v):
            raise ValueError(f"walltime {v!r} is not [D-]HH:MM:SS")
        return v


RUNNERS = ("local", "local-gpus", "slurm")    # flows/runners.py: threads or processes here, Dask workers on this machine's GPUs, SLURM jobs


class Orchestration(Section):
    runner: Literal[RUNNERS]
    local_workers: int = Field(ge=1)
    local_gpus: Literal["auto"] | list[int | str]   # the local-gpus runner's CUDA devices; auto: every one torch sees
    retries: int = Field(ge=0)
    retry_delay_s: int = Field(ge=0)
    timeout_s: int = Field(ge=1)
    timeouts: dict[str, int]
    shard_rows: int = Field(ge=1)
    step_gpus: dict[str, int]                 # step name -> GPUs its job uses data-parallel (missing = 1)
    slurm: Slurm
    estimate: dict[str, Any]                  # priced and checked by lmsys.plan


# ---------------------------------------------------------------- the whole file

class Settings(Section):
    """A resolved configuration: params.yaml's sections after the profile and the overrides."""
    profile: str
    seed: int
    root: Optional[str] = None                # where data/, artifacts/, reports/ go (set by --root / the flow)
    data: Data
    demo: Demo
    folds: Folds
    text: Text
    models: Models
    trainer: TrainerSettings
    post_pretrain: PostPretrain
    filter_argmax: FilterArgmax
    train_teacher: TrainTeacher
    teacher_logits: TeacherLogits
    calibrate: Calibrate
    distill: Distill
    ensemble: Ensemble
    quantize: Quantize
    predict: Predict
    infer: Infer
    serve: Serve
    evaluate: Evaluate
    orchestration: Orchestration

    @model_validator(mode="after")
    def _rows_fit_a_pack(self):
        longest = max(self.text.infer_max_length, self.text.train_max_length)
        if self.infer.pack_tokens < longest:
            raise ValueError(f"infer.pack_tokens {self.infer.pack_tokens} is shorter than the longest row "
                             f"(text.infer_max_length / train_max_length: {longest}): no pack could hold it")
        return self


# The training sections and the typed object the trainer gets for each.
TRAINING_SECTIONS: dict[str, type[TrainerSettings]] = {
    "post_pretrain": PostPretrain, "train_teacher": TrainTeacher, "distill": Distill}


def training_settings(cfg: dict, section: str) -> TrainerSettings:
    """The typed settings of training section `section` ("post_pretrain", "train_teacher", "distill")."""
    return TRAINING_SECTIONS[section].model_validate(cfg[section])


def validated(cfg: dict) -> tuple[dict | None, list[tuple[str, str]]]:
    """(cfg with its values read as the schema's types: "1e-3" for a number is 0.001; None when it is
    invalid, the same keys as `cfg`, defaults not added) and every way it breaks the schema, one line
    each as (key, `<key>: <reason>`) ([] when it is valid)."""
    try:
        return Settings.model_validate(cfg).model_dump(exclude_unset=True), []
    except ValidationError as e:
        return None, [(".".join(str(p) for p in err["loc"]), _describe(err)) for err in e.errors()]


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: missing"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {ctx.get('expected')}"
    reason = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":                 # the validators above name the value themselves
        return f"{key}: {reason}" if key else reason
    return f"{key}: {reason.replace('Input should', f'{value!r} should', 1)}"
