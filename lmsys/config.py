"""params.yaml -> one resolved config dict.

Resolution order (later wins): params.yaml top-level sections, then `profiles.<profile>`
(deep-merged into the sections of the same name), then overrides given as dotted keys
(`{"train_teacher.lr": 1e-3}`) by the CLI or the flow.

The trainer settings are written once: `trainer` holds the defaults of the training steps'
sections (TRAINING_SECTIONS), and each section overrides what differs. Within each of the three
layers (params.yaml, the profile, the overrides) `trainer` is spread into those sections before the
layer is merged, so a section's own key beats `trainer` of its layer and a later layer beats both.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS_PATH = ROOT / "params.yaml"
PROFILES = ("tiny", "small", "full", "gpu-smoke")
TRAINER = "trainer"                                              # the training steps' default settings
TRAINING_SECTIONS = ("post_pretrain", "train_teacher", "distill")  # the sections that take them
# libyaml's safe loader when PyYAML has it (10x faster: the flow resolves params.yaml on every run)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """params.yaml or an override is not usable (unknown profile, unknown key)."""


def deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """cfg["a"]["b"] = value for key "a.b"; the path must already exist (typos fail loudly)."""
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config key {key!r} (no section {p!r})")
        node = node[p]
    if parts[-1] not in node and not (len(parts) >= 2 and parts[-2] == "specs"):
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = value


def get_dotted(cfg: Mapping, key: str) -> Any:
    """cfg["a"]["b"] for key "a.b"; None where the path does not exist."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def load_config(profile: str | None = None, overrides: Mapping[str, Any] | None = None,
                params_path: Path | str | None = None) -> dict:
    """Return the resolved config of `profile` (default: params.yaml's `profile`)."""
    path = Path(params_path) if params_path else PARAMS_PATH
    raw = yaml.load(path.read_text(), Loader=YAML_LOADER)
    profiles = raw.pop("profiles", {}) or {}
    profile = profile or raw.get("profile", "tiny")
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}; params.yaml has {sorted(profiles)}")
    cfg = deep_merge(with_trainer(raw), with_trainer(profiles[profile]))
    cfg["profile"] = profile
    over = dict(overrides or {})
    trainer = {k.split(".", 1)[1]: over.pop(k) for k in list(over) if k.startswith(TRAINER + ".")}
    for k, v in trainer.items():               # an override of trainer.<key>: every training section's too
        for section in (TRAINER, *TRAINING_SECTIONS):
            set_dotted(cfg, f"{section}.{k}", v)
    for k, v in over.items():
        set_dotted(cfg, k, v)
    return cfg


def with_trainer(layer: Mapping) -> dict:
    """One layer of the config with its `trainer` defaults spread into each training section it
    sets or that `trainer` would fill (the section's own keys win)."""
    out = dict(layer)
    defaults = layer.get(TRAINER) or {}
    if defaults:
        for section in TRAINING_SECTIONS:
            out[section] = {**defaults, **(layer.get(section) or {})}
    return out


def section_hash(cfg: Mapping, *sections: str) -> str:
    """Stable hash of the named config sections (for cache keys)."""
    import hashlib
    blob = json.dumps({s: cfg.get(s) for s in sections}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[str, Any]:
    """'train_teacher.lr=1e-3' -> ('train_teacher.lr', 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


class ReadLog(dict):
    """A config (or one of its sections) that records in `reads` the dotted key of every value read
    from it: `cfg["text"]["template"]` records "text.template". Iterating a section, or copying it,
    records the whole section. The test of the step declarations runs every step on one
    (tests/test_pipeline_tiny.py): a step must declare (Step.params) every key it reads."""

    def __init__(self, data=(), prefix: str = "", reads: set | None = None):
        super().__init__(data)
        self.prefix, self.reads = prefix, reads if reads is not None else set()

    def _value(self, key, value):
        dotted = f"{self.prefix}{key}"
        if isinstance(value, dict):
            return ReadLog(value, dotted + ".", self.reads)
        self.reads.add(dotted)
        return value

    def __getitem__(self, key):
        return self._value(key, super().__getitem__(key))

    def get(self, key, default=None):
        if key in self:
            return self[key]
        self.reads.add(f"{self.prefix}{key}")
        return default

    def _whole(self) -> None:
        self.reads.add(self.prefix.rstrip(".") or "*")

    def __iter__(self):
        self._whole()
        return super().__iter__()

    def keys(self):
        self._whole()
        return super().keys()

    def items(self):
        self._whole()
        return super().items()

    def values(self):
        self._whole()
        return super().values()

    def copy(self):
        self._whole()
        return dict(super().items())

    def __reduce_ex__(self, protocol):
        self._whole()
        return dict, (dict(super().items()),)


def undeclared(reads: set[str], declared: tuple[str, ...], free: tuple[str, ...] = ("profile", "root")) -> list[str]:
    """The keys in `reads` that no key in `declared` covers (a declared key covers itself and every
    key below it: "text" covers "text.template"), leaving out the `free` keys every step may read."""
    def covered(key: str) -> bool:
        return any(key == d or key.startswith(d + ".") for d in (*declared, *free))
    return sorted(k for k in reads if not covered(k))
