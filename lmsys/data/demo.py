"""An embedded, synthetic LMSYS competition: every file in the exact real schema, labels drawn
from a KNOWN latent preference model, so the whole pipeline runs (and can be checked against
the Bayes-optimal log loss) with no download.

Files (see demo_paths): train.csv, test.csv + test_labels.csv (Kaggle), external_33k.jsonl
(lmsys/chatbot_arena_conversations), ut.parquet (UltraFeedback in the Kaggle format), truth.json.

The latent model reads only features visible in the response texts, so a small byte-level
BPE transformer can learn it:
    u(resp) = w_len * log(1 + words) + w_kw * quality_markers - w_bad * refusals
    d = u(A) - u(B) + position_bias
    P(A, B, tie) = softmax([d / 2, -d / 2, tie_bias - tie_slope * |d|])
(Bradley-Terry with a tie class whose logit is largest when the two answers are close.)
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys.data.schema import KAGGLE_TEST_COLUMNS, KAGGLE_TRAIN_COLUMNS, LABELS, WINNER_COLUMNS
from lmsys.io import atomic_path, write_json, write_table

LATENT = {   # tuned so Bayes log loss ~0.81 with Kaggle-like shares (A 35%, B 34%, tie 31%)
    "w_len": 0.8,           # per nat of response length (words over all turns)
    "w_kw": 0.6,            # per quality marker ("certainly", "step", a "* " bullet line)
    "w_bad": 2.0,           # per refusal ("sorry I cannot")
    "position_bias": 0.05,  # a slight preference for A, as in the real data
    "tie_bias": 0.9,
    "tie_slope": 0.5,
}
QUALITY_RE = re.compile(r"\bcertainly\b|\bstep\b|^\* ", re.IGNORECASE | re.MULTILINE)
REFUSAL_RE = re.compile(r"sorry I cannot", re.IGNORECASE)

# name: (skill, refusal rate per turn). Skill raises length and marker use, so model names carry
# signal in train (as in the real data) while the label still depends on the text alone.
MODELS = {
    "gpt-4-1106-preview": (1.2, 0.02), "gpt-4-0613": (1.0, 0.03), "gpt-4-0314": (1.0, 0.03),
    "claude-2.1": (0.6, 0.15), "claude-2.0": (0.6, 0.10), "claude-instant-1": (0.3, 0.08),
    "gemini-pro": (0.5, 0.05), "mixtral-8x7b-instruct-v0.1": (0.5, 0.03),
    "gpt-3.5-turbo-0613": (0.4, 0.04), "yi-34b-chat": (0.2, 0.03), "llama-2-70b-chat": (0.1, 0.12),
    "vicuna-33b": (0.0, 0.04), "qwen-14b-chat": (-0.1, 0.04), "llama-2-13b-chat": (-0.2, 0.12),
    "mistral-7b-instruct": (-0.2, 0.03), "vicuna-13b": (-0.3, 0.04), "zephyr-7b-beta": (-0.3, 0.03),
    "koala-13b": (-0.8, 0.05), "chatglm-6b": (-1.0, 0.05), "oasst-pythia-12b": (-1.0, 0.05),
    "alpaca-13b": (-1.0, 0.05), "RWKV-4-Raven-14B": (-1.1, 0.04), "claude-v1": (0.7, 0.06),
    "gpt-4": (1.0, 0.03), "gpt-3.5-turbo": (0.4, 0.04), "palm-2": (0.0, 0.08),
    "fastchat-t5-3b": (-0.9, 0.04), "dolly-v2-12b": (-1.2, 0.03), "wizardlm-70b": (0.3, 0.03),
    "ultralm-65b": (0.1, 0.03), "falcon-40b-instruct": (-0.6, 0.04), "starchat": (-0.7, 0.03),
    "mpt-30b-chat": (-0.3, 0.04), "pythia-12b": (-1.2, 0.03), "alpaca-7b": (-1.1, 0.03),
    "bard": (0.3, 0.06),
}
KAGGLE_MODELS = list(MODELS)[:22]
ARENA_MODELS = ["claude-v1", "gpt-4", "gpt-3.5-turbo", "vicuna-13b", "koala-13b", "alpaca-13b",
                "chatglm-6b", "oasst-pythia-12b", "fastchat-t5-3b", "dolly-v2-12b", "palm-2",
                "RWKV-4-Raven-14B", "claude-instant-1"]
UT_MODELS = ["gpt-4", "gpt-3.5-turbo", "wizardlm-70b", "ultralm-65b", "llama-2-70b-chat",
             "falcon-40b-instruct", "starchat", "mpt-30b-chat", "pythia-12b", "alpaca-7b",
             "bard", "vicuna-33b"]

# Plain filler words: none of them contains a marker, so the features count only what we insert.
VOCAB = np.array((
    "the a of to and in is it that for on with as this be are by an at from or can will data "
    "model answer question time people system value number example result code function list "
    "world city water energy light history music language book story game market price plan "
    "simple quick better large small first second new old good important different possible "
    "use make find give show take write read build learn explain compare consider improve "
    "because however also often usually which when where there their about into over between "
    "after before each every many most some other such only very more less well just then"
).split(), dtype=object)
UNICODE_VOCAB = np.array(["café", "naïve", "résumé", "façade", "Zürich", "über", "niño", "São", "東京",
                          "数据", "模型", "问题", "こんにちは", "안녕하세요", "Привет", "λ", "🙂", "🚀",
                          "✨", "👍", "—", "«ok»"], dtype=object)
COMMON_PROMPTS = ["hi", "Hello", "What is the meaning of life?", "tell me a joke",
                  "who are you?", "Write a poem about the sea"]


def demo_paths(out_dir: str | Path) -> dict[str, Path]:
    """The demo files under `out_dir`, by role (the one place that names them)."""
    d = Path(out_dir)
    return {"train": d / "train.csv", "test": d / "test.csv", "test_labels": d / "test_labels.csv",
            "external": d / "external_33k.jsonl", "ut": d / "ut.parquet", "truth": d / "truth.json"}


# ---------------------------------------------------------------- the latent preference model

def response_features(turns) -> tuple[float, int, int]:
    """(log(1 + words), quality markers, refusals) over a response's turns; None turns count as ""."""
    text = "\n".join(t for t in turns if t)
    return math.log1p(len(text.split())), len(QUALITY_RE.findall(text)), len(REFUSAL_RE.findall(text))


def utility(turns, latent: dict = LATENT) -> float:
    log_words, quality, refusals = response_features(turns)
    return latent["w_len"] * log_words + latent["w_kw"] * quality - latent["w_bad"] * refusals


def true_probs(response_a, response_b, latent: dict = LATENT) -> np.ndarray:
    """The generating [P(A), P(B), P(tie)] of one battle (lists of turn texts; None allowed)."""
    d = utility(response_a, latent) - utility(response_b, latent) + latent["position_bias"]
    z = np.array([d / 2, -d / 2, latent["tie_bias"] - latent["tie_slope"] * abs(d)])
    e = np.exp(z - z.max())
    return e / e.sum()


# ---------------------------------------------------------------- text generation

def _sentences(rng: np.random.Generator, tokens: list[str], question: bool = False) -> str:
    """Join tokens into capitalised sentences of ~4-16 words."""
    out, i = [], 0
    while i < len(tokens):
        n = 4 + int(rng.poisson(7))
        s = " ".join(tokens[i:i + n])
        out.append(s[:1].upper() + s[1:] + ("?" if question and i + n >= len(tokens) else "."))
        i += n
    return " ".join(out).replace(" \n", "\n").strip()


def _words(rng: np.random.Generator, n: int, unicode: bool) -> list[str]:
    words = VOCAB[rng.integers(0, len(VOCAB), n)]
    if unicode:  # ~10% of words from the unicode list, so the tokenizer meets multi-byte text
        mask = rng.random(n) < 0.1
        words[mask] = UNICODE_VOCAB[rng.integers(0, len(UNICODE_VOCAB), int(mask.sum()))]
    return words.tolist()


def _prompt_turn(rng: np.random.Generator) -> str:
    """Mostly short (median ~14 words), 4% long (hundreds of words), 4% a common one-liner."""
    r = rng.random()
    if r < 0.04:
        return COMMON_PROMPTS[rng.integers(len(COMMON_PROMPTS))]
    mu, sigma = (5.5, 0.6) if r < 0.08 else (2.6, 0.8)
    n = int(np.clip(rng.lognormal(mu, sigma), 1, 1200))
    return _sentences(rng, _words(rng, n, rng.random() < 0.15), question=True)


def _response_turn(rng: np.random.Generator, model: str) -> str:
    """One answer turn in `model`'s style: a short refusal, or heavy-tailed length with markers."""
    skill, refuse = MODELS[model]
    unicode = rng.random() < 0.12
    if rng.random() < refuse:
        return _sentences(rng, ["sorry I cannot"] + _words(rng, int(rng.integers(2, 14)), unicode))
    # lognormal word count: median ~110-180, ~0.5% reach the 1500 cap (exercises truncation)
    n = int(np.clip(rng.lognormal(4.7 + 0.25 * skill, 1.0), 3, 1500))
    tokens = _words(rng, n, unicode)
    k = min(int(rng.poisson(math.exp(0.3 + 0.4 * skill))), n // 3)
    for pos in sorted(rng.integers(0, n, k).tolist(), reverse=True):
        kind = rng.integers(3)
        if kind == 2:   # a bullet line; several markers at one position just stack
            tokens[pos] = "\n* " + tokens[pos]
        else:
            tokens.insert(pos, ("certainly", "step")[kind])
    return _sentences(rng, tokens)


def _n_turns(rng: np.random.Generator, multi_turn: bool) -> int:
    """~85% single-turn, the rest 2-4 turns."""
    if not multi_turn:
        return 1
    return int(rng.choice([1, 2, 3, 4], p=[0.85, 0.09, 0.04, 0.02]))


def _battles(rng: np.random.Generator, n: int, models: list[str], multi_turn: bool = True) -> list[dict]:
    """n unlabelled battles between two distinct models: prompt / response_a / response_b turn lists."""
    rows = []
    for _ in range(n):
        ma, mb = rng.choice(len(models), 2, replace=False)
        turns = _n_turns(rng, multi_turn)
        rows.append({"model_a": models[ma], "model_b": models[mb],
                     "prompt": [_prompt_turn(rng) for _ in range(turns)],
                     "response_a": [_response_turn(rng, models[ma]) for _ in range(turns)],
                     "response_b": [_response_turn(rng, models[mb]) for _ in range(turns)]})
    return rows


def _add_nulls(rng: np.random.Generator, rows: list[dict], share: float = 0.01) -> None:
    """Set ~`share` of all turn entries (at least one) to None, as in the raw Kaggle files.

    Only later turns of multi-turn rows: a null there is kept as "" with a warning, whereas a
    conversation or answer with no content at all is quarantined by validation."""
    slots = [(i, f, t) for i, r in enumerate(rows) for f in ("prompt", "response_a", "response_b")
             for t in range(1, len(r[f]))]
    if not slots:
        return
    for j in rng.choice(len(slots), max(1, round(share * len(slots))), replace=False):
        i, f, t = slots[j]
        rows[i][f][t] = None


def _label(rng: np.random.Generator, rows: list[dict]) -> np.ndarray:
    """Draw each row's label from the latent model; stores row["probs"] and row["label"]; returns probs."""
    probs = np.array([true_probs(r["response_a"], r["response_b"]) for r in rows]).reshape(-1, 3)
    u = rng.random(len(rows))
    labels = (u[:, None] > np.cumsum(probs, axis=1)[:, :2]).sum(axis=1)
    for r, p, y in zip(rows, probs, labels):
        r["probs"], r["label"] = p, int(y)
    return probs


# ---------------------------------------------------------------- file formats

def _ids(rng: np.random.Generator, n: int) -> list[int]:
    """n distinct random-looking integer ids, 6 to 10 digits (log-uniform, like Kaggle's)."""
    draw = (10 ** rng.uniform(5, math.log10(4_294_967_295), 2 * n + 16)).astype(np.int64)
    ids = pd.unique(draw)[:n]
    if len(ids) < n:  # practically impossible at these sizes; fail loudly rather than collide
        raise RuntimeError("id draw collided too often")
    return [int(i) for i in ids]


def _dumps(turns: list) -> str:
    return json.dumps(turns, ensure_ascii=False)


def _kaggle_frame(rows: list[dict], ids: list[int], labelled: bool = True) -> pd.DataFrame:
    """Kaggle train.csv columns (or test.csv's when not `labelled`)."""
    df = pd.DataFrame({"id": pd.Series(ids, dtype="int64"),   # int64 even when empty
                       "model_a": [r["model_a"] for r in rows], "model_b": [r["model_b"] for r in rows],
                       **{f: [_dumps(r[f]) for r in rows] for f in ("prompt", "response_a", "response_b")}})
    for k, col in enumerate(WINNER_COLUMNS):
        df[col] = [int(r["label"] == k) for r in rows]
    return df[KAGGLE_TRAIN_COLUMNS if labelled else KAGGLE_TEST_COLUMNS]


def _conversation(prompt: list[str], response: list[str]) -> list[dict]:
    return [m for p, a in zip(prompt, response)
            for m in ({"role": "user", "content": p}, {"role": "assistant", "content": a})]


def _arena_record(rng: np.random.Generator, r: dict) -> dict:
    """One line of the 33k file (lmsys/chatbot_arena_conversations) for battle `r`."""
    winner = ("model_a", "model_b", "tie")[r["label"]]
    if winner == "tie" and rng.random() < 0.4:
        winner = "tie (bothbad)"
    return {"question_id": rng.bytes(16).hex(), "model_a": r["model_a"], "model_b": r["model_b"],
            "winner": winner, "judge": f"arena_user_{int(rng.integers(1000, 99999))}",
            "conversation_a": _conversation(r["prompt"], r["response_a"]),
            "conversation_b": _conversation(r["prompt"], r["response_b"]),
            "turn": len(r["prompt"]), "anony": True, "language": "English",
            "tstamp": round(1682351591.0 + float(rng.uniform(0, 8e6)), 4),
            "openai_moderation": {}, "toxic_chat_tag": {}}


def _external(rng: np.random.Generator, n: int, train_rows: list[dict]) -> tuple[list, list, list]:
    """n arena battles: fresh ones plus up to 3 exact copies of null-free train battles (leaks).
    Returns (battles, their 33k records, [(leak question_id, position of the train row it copies)])."""
    clean = [i for i, r in enumerate(train_rows)
             if all(t is not None for f in ("prompt", "response_a", "response_b") for t in r[f])]
    n_leak = min(3, n // 10, len(clean))   # ~1% of the file, as a handful of real leaks
    leak_src = sorted(rng.choice(clean, n_leak, replace=False).tolist()) if n_leak else []
    fresh = _battles(rng, n - n_leak, ARENA_MODELS)
    _label(rng, fresh)
    rows = fresh + [train_rows[i] for i in leak_src]
    order = rng.permutation(len(rows)).tolist()   # leaks land at random positions
    records = [_arena_record(rng, rows[j]) for j in order]
    leaks = [(rec["question_id"], leak_src[j - len(fresh)])
             for rec, j in zip(records, order) if j >= len(fresh)]
    return [rows[j] for j in order], records, leaks


def _set_summary(rows: list[dict]) -> dict:
    """rows, class counts, Bayes / prior / uniform log loss of one labelled set."""
    y = np.array([r["label"] for r in rows], dtype=int)
    p = np.array([r["probs"] for r in rows]).reshape(-1, 3)
    counts = np.bincount(y, minlength=3)
    share = counts / max(len(y), 1)
    bayes = float(-np.log(p[np.arange(len(y)), y]).mean()) if len(y) else None   # None: no rows
    return {"rows": len(rows), "class_counts": dict(zip(LABELS, counts.tolist())), "bayes_log_loss": bayes,
            "prior_log_loss": float(-sum(s * math.log(s) for s in share if s > 0)),
            "uniform_log_loss": math.log(3)}


# ---------------------------------------------------------------- the whole competition

def make_demo_data(out_dir: str | Path, rows: int = 1200, test_rows: int = 200, external_rows: int = 300,
                   ut_rows: int = 400, seed: int = 0) -> dict[str, Path]:
    """Write the demo competition under `out_dir`; returns demo_paths(out_dir).

    Deterministic: the same seed gives the same bytes. Each file is written atomically, so an
    interrupted run never leaves a half file (truth.json goes last: its presence means complete).
    Supports rows, test_rows >= 1 and external_rows, ut_rows >= 0.
    Raises ValueError on other sizes.
    """
    if rows < 1 or test_rows < 1 or external_rows < 0 or ut_rows < 0:
        raise ValueError(f"bad demo sizes: rows={rows} test_rows={test_rows} "
                         f"external_rows={external_rows} ut_rows={ut_rows}")
    rng = np.random.default_rng(seed)
    paths = demo_paths(out_dir)
    sets = {"train": _battles(rng, rows, KAGGLE_MODELS), "test": _battles(rng, test_rows, KAGGLE_MODELS),
            "ut": _battles(rng, ut_rows, UT_MODELS, multi_turn=False)}   # UltraFeedback is single-turn
    _add_nulls(rng, sets["train"])
    _add_nulls(rng, sets["test"])
    for name in ("train", "test", "ut"):   # label after nulling: a null turn changes the features
        _label(rng, sets[name])
    ids = _ids(rng, rows + test_rows + ut_rows)   # one draw: unique across train, test and ut
    train_ids, test_ids, ut_ids = ids[:rows], ids[rows:rows + test_rows], ids[rows + test_rows:]
    sets["external"], records, leaks = _external(rng, external_rows, sets["train"])

    write_table(_kaggle_frame(sets["train"], train_ids), paths["train"])
    write_table(_kaggle_frame(sets["test"], test_ids, labelled=False), paths["test"])
    write_table(_kaggle_frame(sets["test"], test_ids)[["id", *WINNER_COLUMNS]], paths["test_labels"])
    write_table(_kaggle_frame(sets["ut"], ut_ids), paths["ut"])
    with atomic_path(paths["external"]) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    truth = {"seed": seed, "latent": LATENT, "models": {m: list(v) for m, v in MODELS.items()},
             "quality_regex": QUALITY_RE.pattern, "refusal_regex": REFUSAL_RE.pattern,
             **{name: _set_summary(battles) for name, battles in sets.items()},
             "external_leaks": [q for q, _ in leaks],
             "external_leak_train_ids": [train_ids[i] for _, i in leaks]}
    write_json(truth, paths["truth"])
    return paths
