"""params.yaml -> one resolved config dict.

Resolution order (later wins): params.yaml top-level sections, then `profiles.<profile>`
(deep-merged into the sections of the same name), then overrides given as dotted keys
(`{"train_teacher.lr": 1e-3}`) by the CLI or the flow.
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
    cfg = deep_merge(raw, profiles[profile])
    cfg["profile"] = profile
    for k, v in (overrides or {}).items():
        set_dotted(cfg, k, v)
    return cfg


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
