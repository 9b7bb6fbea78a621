"""The public UltraFeedback release -> the competition format (the recipe's "UT" data).

Supported inputs (json, jsonl or parquet; read by lmsys.data.validate.read_raw):
  openbmb   openbmb/UltraFeedback: one row per instruction, `instruction` and `completions`, a list
            of {model, response, overall_score, fine-grained_score, annotations, ...} (usually 4)
  binarized HuggingFaceH4/ultrafeedback_binarized (and its look-alikes): `prompt`, `chosen`,
            `rejected` (each a list of {role, content} messages or a plain string), `score_chosen`,
            `score_rejected`

The rule (one battle = prompt, response A, response B, one-hot winner):
  openbmb   the completions are paired in release order, (1st, 2nd), (3rd, 4th), ... (a 5th left
            over is dropped); each completion's score is `overall_score` when both completions of
            the pair have one, else `fine-grained_score` (the mean of the four aspect ratings), else
            the mean of the annotations' numeric `Rating`s. A wins when its score is higher by more
            than `tie_margin`, B when lower, a tie otherwise. model_a/model_b are the completions'
            models.
  binarized the chosen response goes to A on even rows and to B on odd rows (so A and B win equally
            often); a tie when |score_chosen - score_rejected| <= tie_margin, else the chosen side
            wins. Models are unknown (""). Message lists keep their user turns as the prompt and
            their assistant turns as the response.
  Ids are integers derived from the prompt text and the pair's position (openbmb) or the row number
  (binarized): the same file converts to the same ids.
Rows that cannot be converted (no instruction, fewer than two completions, missing scores, empty
responses, values of the wrong type, a row repeated verbatim) are skipped and counted by reason,
with their row numbers; nothing else is dropped. Raises ValueError for a table that is in neither
schema.
"""
from __future__ import annotations

import hashlib
import json
import math

import pandas as pd

from lmsys.data import schema

SCHEMAS = {"openbmb": ("instruction", "completions"), "binarized": ("prompt", "chosen", "rejected")}


def detect_schema(df: pd.DataFrame) -> str:
    """"openbmb" or "binarized" from the columns; ValueError otherwise."""
    for name, cols in SCHEMAS.items():
        if set(cols) <= set(df.columns):
            return name
    raise ValueError(f"neither UltraFeedback schema: columns {sorted(df.columns)[:12]}; need "
                     f"{list(SCHEMAS['openbmb'])} (openbmb/UltraFeedback) or {list(SCHEMAS['binarized'])} (binarized)")


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _battle_id(prompt: str, i: int) -> str:
    return str(int(hashlib.sha1(f"{prompt}\x00{i}".encode("utf-8", "surrogatepass")).hexdigest()[:15], 16))


def _label(score_a: float, score_b: float, tie_margin: float) -> int:
    return 2 if abs(score_a - score_b) <= tie_margin else (0 if score_a > score_b else 1)


def _row(rid, model_a, model_b, prompt: list[str], a: list[str], b: list[str], label: int) -> dict:
    return {"id": rid, "model_a": model_a, "model_b": model_b, "prompt": json.dumps(prompt, ensure_ascii=False),
            "response_a": json.dumps(a, ensure_ascii=False), "response_b": json.dumps(b, ensure_ascii=False),
            **dict(zip(schema.WINNER_COLUMNS, schema.one_hot(label)))}


class Skip(Exception):
    """A row (or an openbmb pair) that cannot be converted; the message is its reason."""


def _score(c: dict, key: str) -> float | None:
    if key != "annotations":
        return _number(c.get(key))
    notes = _plain(c.get("annotations"))
    notes = notes.values() if isinstance(notes, dict) else notes if isinstance(notes, list) else []   # by aspect, or a list
    ratings = [_number(a.get("Rating")) for a in notes if isinstance(a, dict)]
    ratings = [r for r in ratings if r is not None]
    return sum(ratings) / len(ratings) if ratings else None


def _openbmb(r: dict, tie_margin: float, skip) -> list[dict]:
    """The battles of one openbmb row; a pair that cannot be converted is skip(reason)ped, a row
    that cannot be raises Skip."""
    prompt = r.get("instruction")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Skip("no_instruction")
    comps = _plain(r.get("completions"))
    if not isinstance(comps, list) or not all(isinstance(c, dict) for c in comps):
        raise Skip("bad_completions")          # null, a number, a string, or entries that are not objects
    if len(comps) < 2:
        raise Skip("fewer_than_two_completions")
    out = []
    for i in range(0, len(comps) - 1, 2):
        a, b = comps[i], comps[i + 1]
        key = next((k for k in ("overall_score", "fine-grained_score", "annotations")
                    if _score(a, k) is not None and _score(b, k) is not None), None)
        ra, rb = a.get("response"), b.get("response")
        if key is None:
            skip("no_score")
        elif not (isinstance(ra, str) and isinstance(rb, str) and ra.strip() and rb.strip()):
            skip("empty_response")
        else:
            out.append(_row(_battle_id(prompt, i), str(a.get("model") or ""), str(b.get("model") or ""), [prompt],
                            [ra], [rb], _label(_score(a, key), _score(b, key), tie_margin)))
    return out


def _turns(side, prompt, name: str) -> tuple[list[str], list[str]]:
    """(user turns, assistant turns) of a message list, or ([prompt], [text]) of a plain string.
    Raises Skip(bad_<name>) for anything else (null, a number) and a plain string without a prompt."""
    side = _plain(side)
    if isinstance(side, str):
        if not isinstance(prompt, str) or not prompt.strip():
            raise Skip("no_prompt")
        return [prompt], [side]
    if not isinstance(side, list) or not all(isinstance(m, dict) for m in side):
        raise Skip(f"bad_{name}")
    if not all(isinstance(m.get("content"), (str, type(None))) for m in side):
        raise Skip(f"bad_{name}")
    users = [m.get("content") or "" for m in side if m.get("role") == "user"]
    bots = [m.get("content") or "" for m in side if m.get("role") == "assistant"]
    if not users and not (isinstance(prompt, str) and prompt.strip()):
        raise Skip("no_prompt")
    return (users or [prompt]), bots


def _binarized(r: dict, i: int, tie_margin: float) -> list[dict]:
    sc, sr = _number(r.get("score_chosen")), _number(r.get("score_rejected"))
    if sc is None or sr is None:
        raise Skip("no_score")
    pc, chosen = _turns(r.get("chosen"), r.get("prompt"), "chosen")
    pr, rejected = _turns(r.get("rejected"), r.get("prompt"), "rejected")
    if pc != pr or len(chosen) != len(pc) or len(rejected) != len(pc) or not any(t.strip() for t in chosen + rejected):
        raise Skip("bad_conversation")
    label = _label(sc, sr, tie_margin)
    a_is_chosen = i % 2 == 0
    a, b = (chosen, rejected) if a_is_chosen else (rejected, chosen)
    if not a_is_chosen:
        label = {0: 1, 1: 0, 2: 2}[label]
    return [_row(_battle_id(json.dumps(pc), i), "", "", pc, a, b, label)]


def _row_key(r: dict) -> str:
    """The content of a raw row, for finding rows repeated verbatim."""
    blob = json.dumps(r, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    return hashlib.sha1(blob.encode("utf-8", "surrogatepass")).hexdigest()


def convert_ultrafeedback(raw: pd.DataFrame, tie_margin: float = 0.0) -> tuple[pd.DataFrame, dict]:
    """(battles in the Kaggle train.csv columns, {schema, rows_in, battles, skipped: {reason: n},
    skipped_rows: {reason: first row numbers (0-based, at most 5)}}) from a raw UltraFeedback table;
    see the module docstring for the rule. Every row is converted or skipped with a reason: besides
    the rule's reasons, `duplicate_row` (the same row again, verbatim), `duplicate_id` (a battle whose
    id an earlier row's battle has: the same openbmb instruction twice), and malformed values
    (`bad_completions`, `bad_chosen`, `bad_rejected`, `no_prompt`; `malformed` for any other shape,
    with the error's type). Raises ValueError when the table is in neither schema or tie_margin < 0."""
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    release = detect_schema(raw)              # "openbmb" | "binarized"
    skipped: dict[str, int] = {}
    first: dict[str, list[int]] = {}

    def skip(reason: str, row: int) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if len(first.setdefault(reason, [])) < 5:
            first[reason].append(row)

    rows, seen_rows, seen_ids = [], set(), set()
    for i, r in enumerate(raw.to_dict("records")):
        key = _row_key(r)
        if key in seen_rows:
            skip("duplicate_row", i)
            continue
        seen_rows.add(key)
        try:
            battles = (_openbmb(r, tie_margin, lambda reason, i=i: skip(reason, i)) if release == "openbmb"
                       else _binarized(r, i, tie_margin))
        except Skip as e:
            skip(str(e), i)
            continue
        except (TypeError, AttributeError, ValueError, KeyError) as e:   # a shape the rule does not know
            skip(f"malformed ({type(e).__name__})", i)
            continue
        for b in battles:
            if b["id"] in seen_ids:
                skip("duplicate_id", i)
                continue
            seen_ids.add(b["id"])
            rows.append(b)
    out = pd.DataFrame(rows, columns=schema.KAGGLE_TRAIN_COLUMNS)
    return out, {"schema": release, "rows_in": len(raw), "battles": len(out), "skipped": dict(sorted(skipped.items())),
                 "skipped_rows": dict(sorted(first.items()))}
