"""params.yaml -> one resolved, validated config dict (`load_config`), and where each value came from
(`explain`, `lmsys config KEY`).

Layers, later wins: params.yaml's sections, then `profiles.<profile>` (deep-merged into the sections of
the same name), then the overrides given as dotted keys (`--set distill.lr=1e-4`, the flow's
`overrides`). The result is checked against the schema (lmsys.settings) before anything runs.

The one precedence rule for the training settings (written at the top of params.yaml too):
`trainer` holds the defaults of the training sections (post_pretrain, train_teacher, distill). A key a
training section sets itself, in any layer, beats `trainer`'s, in every layer. So `distill.lr` in the
base section holds under every profile that does not set `distill.lr` again, whatever the profile's
`trainer.lr`; and `--set trainer.K=V` changes K in every training section that does not set K
itself (`lmsys config KEY` shows which). stages/lineage.py gives DVC the same dependencies
(`param_sources`).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from lmsys.settings import TRAINING_SECTIONS, validated

ROOT = Path(__file__).resolve().parent.parent
PARAMS_PATH = ROOT / "params.yaml"
# The profiles (params.yaml `profiles:`) and what each is for (the report's first paragraph says it).
PROFILES = {
    "tiny": "a plumbing demo: random-init models (hidden 64, 2 layers) trained for seconds on the embedded "
            "synthetic competition, so that every step runs end to end on a CPU in minutes. Models this small "
            "learn little of the data: its figures show that the pipeline runs and learns something, not what the "
            "recipe reaches",
    "small": "real small pretrained models (Gemma 3 270M, MiniLM) on CPU-sized subsets: the recipe's steps on real "
             "weights, not its quality",
    "full": "the recipe: Llama-3-70B and Qwen2-72B teachers, a Gemma-2-9B student, on GPUs",
    "gpu-smoke": "the full profile's CUDA code paths with small random-init models of the real architectures, in "
                 "minutes on one GPU: its figures say nothing about quality",
}
ProfileName = Literal[tuple(PROFILES)]     # the flows' `profile` parameter (a choice in the Prefect UI)
TRAINER = "trainer"                                              # the training sections' defaults
# libyaml's safe loader when PyYAML has it (10x faster: the flow resolves params.yaml on every run)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
FREE_KEYS = ("profile", "root")          # what every step may read without declaring it


class ConfigError(ValueError):
    """params.yaml or an override is not usable (unknown profile or key, a value the schema refuses)."""


@dataclass
class Layer:
    label: str           # how `lmsys config` names it: "params.yaml", "profiles.tiny", "--set"
    values: dict         # its sections, nested
    replaces: tuple = () # the dotted keys whose whole value it replaces (overrides); a file layer deep-merges


# ---------------------------------------------------------------- dotted keys

def deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def get_dotted(cfg: Mapping, key: str) -> Any:
    """cfg["a"]["b"] for key "a.b"; None where the path does not exist."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def has_dotted(cfg: Mapping, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def nested(key: str, value: Any) -> dict:
    """{"a": {"b": value}} for key "a.b"."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def set_in(cfg: dict, key: str, value: Any) -> None:
    """cfg["a"]["b"] = value for key "a.b" (the sections on the way exist)."""
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = copy.deepcopy(value)


def parse_override(text: str) -> tuple[str, Any]:
    """'train_teacher.lr=1e-3' -> ('train_teacher.lr', '1e-3'); the value is read as YAML (the schema
    then reads '1e-3' as a number where the key is one)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


# ---------------------------------------------------------------- layers and resolution

def read_params(params_path: Path | str | None = None) -> dict:
    """params.yaml as a mapping of sections. Raises ConfigError when it cannot be one."""
    path = Path(params_path) if params_path else PARAMS_PATH
    try:
        raw = yaml.load(path.read_bytes(), Loader=YAML_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML ({' '.join(str(e).split())[:200]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (data:, folds:, ...), got "
                          f"{'an empty file' if raw is None else type(raw).__name__}")
    return raw


def layers(profile: str | None = None, overrides: Mapping[str, Any] | None = None,
           params_path: Path | str | None = None) -> tuple[str, list[Layer]]:
    """(profile, [params.yaml, profiles.<profile>, --set]) for a run."""
    raw = read_params(params_path)
    profiles = raw.pop("profiles", None) or {}
    profile = profile or raw.get("profile", "tiny")
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}: params.yaml has {', '.join(sorted(profiles))}")
    out = [Layer("params.yaml", raw), Layer(f"profiles.{profile}", profiles[profile] or {})]
    known = merge(out)
    over: dict = {}
    for key, value in (overrides or {}).items():
        if not has_dotted(known, key) and not _new_model_spec(key):
            raise ConfigError(f"unknown config key {key!r}" + _near(known, key))
        over = deep_merge(over, nested(key, value))
    if over:
        out.append(Layer("--set", over, replaces=tuple(overrides)))
    return profile, out


def _new_model_spec(key: str) -> bool:
    """`models.specs.<name>`: an override may add a model."""
    parts = key.split(".")
    return len(parts) >= 3 and parts[:2] == ["models", "specs"]


def _near(known: dict, key: str) -> str:
    import difflib
    section, _, rest = key.partition(".")
    pool = list(known.get(section) or {}) if rest else list(known)
    match = difflib.get_close_matches(rest or section, pool, n=1)
    return f" (did you mean {(section + '.' if rest else '') + match[0]!r}?)" if match else ""


def merge(stack: list[Layer]) -> dict:
    """The layers merged (later wins), then each training section filled with the `trainer` keys it
    does not set itself in any layer (the precedence rule in the module docstring)."""
    cfg: dict = {}
    for layer in stack:
        if layer.replaces:                     # `--set models.specs.gemma={...}` is that spec, not merged into it
            for key in layer.replaces:
                cfg = deep_merge(cfg, nested(key, None))
                set_in(cfg, key, get_dotted(layer.values, key))
        else:
            cfg = deep_merge(cfg, layer.values)
    defaults = cfg.get(TRAINER) or {}
    for section in TRAINING_SECTIONS:
        cfg[section] = {**defaults, **(cfg.get(section) or {})}
    return cfg


_resolved: dict[str, dict] = {}     # what load_config resolved in this process, by its inputs


def load_config(profile: str | None = None, overrides: Mapping[str, Any] | None = None,
                params_path: Path | str | None = None) -> dict:
    """The resolved config of `profile` (default: params.yaml's `profile`), checked against the schema
    (lmsys.settings); a copy. A run resolves it once: the launcher, the flow and its tasks in one process
    get copies of the first resolution of the same profile, overrides and params.yaml content. Raises
    ConfigError naming the key for anything the schema refuses."""
    path = Path(params_path) if params_path else PARAMS_PATH
    key = json.dumps([profile, dict(overrides or {}), str(path), _content_hash(path)], sort_keys=True, default=str)
    if key not in _resolved:
        _resolved[key] = resolve(profile, overrides, params_path)
    return copy.deepcopy(_resolved[key])


def _content_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None                             # read_params names the problem


def resolve(profile: str | None = None, overrides: Mapping[str, Any] | None = None,
            params_path: Path | str | None = None) -> dict:
    """load_config's work: the layers merged (`merge`), then validated and typed by the schema."""
    profile, stack = layers(profile, overrides, params_path)
    cfg = merge(stack)
    cfg["profile"] = profile
    typed, bad = validated(cfg)
    if bad:
        key, first = bad[0]
        more = f" (and {len(bad) - 1} more: {'; '.join(text for _, text in bad[1:4])})" if len(bad) > 1 else ""
        raise ConfigError(f"{_source(key, stack, params_path)}: {first}{more}")
    return typed


def _source(key: str, stack: list[Layer], params_path) -> str:
    """Where a refused value was written: `--set`, or the params file's section or profile."""
    name = (Path(params_path) if params_path else PARAMS_PATH).name
    section, _, rest = key.partition(".")
    candidates = [key] + ([f"{TRAINER}.{rest}"] if section in TRAINING_SECTIONS and rest else [])
    for layer in reversed(stack):
        if any(has_dotted(layer.values, k) for k in candidates):
            return "--set" if layer.label == "--set" else f"{name} {layer.label}".replace(f"{name} {name}", name)
    return name


# ---------------------------------------------------------------- where a value comes from

def explain(key: str, profile: str | None = None, overrides: Mapping[str, Any] | None = None,
            params_path: Path | str | None = None) -> list[str]:
    """The lines `lmsys config KEY` prints: the resolved value, then every layer that sets it (the last
    one wins), or, for a training section's key it does not set itself, the `trainer` layers it
    falls back on. A section prints each of its keys. Raises ConfigError for an unknown key."""
    profile, stack = layers(profile, overrides, params_path)
    cfg = merge(stack)
    cfg["profile"] = profile
    if not has_dotted(cfg, key):
        raise ConfigError(f"unknown config key {key!r}" + _near(cfg, key))
    value = get_dotted(cfg, key)
    if isinstance(value, dict):                # a section: each of its keys
        return [line for k in value for line in explain_leaf(f"{key}.{k}", cfg, stack)]
    return explain_leaf(key, cfg, stack)


def explain_leaf(key: str, cfg: dict, stack: list[Layer]) -> list[str]:
    lines = [f"{key} = {_show(get_dotted(cfg, key))}"]
    setters = [(layer.label, key, get_dotted(layer.values, key)) for layer in stack if has_dotted(layer.values, key)]
    section, _, rest = key.partition(".")
    fallback = TRAINER + "." + rest
    inherits = section in TRAINING_SECTIONS and rest and not setters
    if inherits:
        setters = [(layer.label, fallback, get_dotted(layer.values, fallback))
                   for layer in stack if has_dotted(layer.values, fallback)]
    for i, (label, k, v) in enumerate(setters):
        lines.append(f"  {label:<18} {k} = {_show(v)}" + ("   <- wins" if i == len(setters) - 1 else ""))
    if inherits:
        lines.append(f"  ({section} does not set {rest} itself: the trainer default applies)")
    elif section in TRAINING_SECTIONS and rest:
        shadowed = [layer.label for layer in stack if has_dotted(layer.values, fallback)]
        if shadowed:
            lines.append(f"  ({fallback} in {', '.join(shadowed)} does not apply: {section} sets {rest} itself)")
    if key == "profile":
        lines.append(f"  {'--profile':<18} or params.yaml profile")
    return lines


def _show(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def param_sources(key: str, profile: str, params_path: Path | str | None = None) -> list[str]:
    """The params.yaml keys (dotted, `profiles.<p>.` for the profile's) that can change `key`'s
    resolved value under `profile`: its own, and, for a training section, the `trainer` keys it falls
    back on (only those it does not set itself: the precedence rule). For DVC's `params:`."""
    _, stack = layers(profile, None, params_path)
    base, prof = stack[0].values, stack[1].values
    prefix = f"profiles.{profile}."
    own = [k for k, layer in ((key, base), (prefix + key, prof)) if has_dotted(layer, key)]
    section, _, rest = key.partition(".")
    if section not in TRAINING_SECTIONS:
        return own
    explicit = set(base.get(section) or {}) | set(prof.get(section) or {})
    trainer_keys = [rest] if rest else [k for k in merge(stack)[TRAINER] if k not in explicit]
    out = list(own)
    for k in trainer_keys:
        if k in explicit:
            continue
        t = f"{TRAINER}.{k}"
        out += [name for name, layer in ((t, base), (prefix + t, prof)) if has_dotted(layer, t)]
    return out


# ---------------------------------------------------------------- what one step sees

class UndeclaredKey(KeyError):
    """A step read a params.yaml key that its recipe entry (Step.params) does not declare."""


class StepConfig(dict):
    """The part of a config one step declared (lmsys.steps.recipe, Step.params): reading any other key
    of the config, by [] or .get, raises UndeclaredKey, so a step cannot depend on a value its cache
    key and its DVC stage do not hold."""

    def __init__(self, data: dict, hidden: dict, path: str = ""):
        super().__init__(data)
        self._hidden, self._path = hidden, path

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)

    def _check(self, key) -> None:
        if key in self._hidden:
            raise UndeclaredKey(f"the step reads {self._path}{key}, which its recipe entry does not declare "
                                f"(lmsys/steps/recipe.py params)")

    def __reduce__(self):                      # pickles (to a worker) as the plain dict it holds
        return dict, (dict(self),)


def for_step(cfg: Mapping, declared: tuple[str, ...]) -> StepConfig:
    """The view of `cfg` that a step declaring `declared` (dotted keys or sections) may read: those
    keys (and everything below them) and FREE_KEYS; any other key raises UndeclaredKey."""
    return _project(cfg, [d.split(".") for d in (*declared, *FREE_KEYS)], "")


def _project(node: Mapping, paths: list[list[str]], prefix: str) -> StepConfig:
    shown, hidden = {}, {}
    for key, value in node.items():
        below = [p[1:] for p in paths if p and p[0] == key]
        if any(not p for p in below):          # the key itself is declared: all of it
            shown[key] = value
        elif below and isinstance(value, Mapping):
            shown[key] = _project(value, below, f"{prefix}{key}.")
        else:
            hidden[key] = True
    return StepConfig(shown, hidden, prefix)
