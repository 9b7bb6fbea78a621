"""Read any supported input file, validate every row, normalise to the canonical table.

Supports:
  kaggle         Kaggle train.csv / test.csv (prompt and responses are JSON lists of strings/nulls)
  ultrafeedback  UltraFeedback in the LMSYS schema (same columns as train.csv), csv or parquet
  arena33k       lmsys/chatbot_arena_conversations ("33k"): json, jsonl or parquet

Every row is either used (the clean table) or quarantined with a reason; rows_in == rows_clean +
rows_quarantined always. Raises `UnusableFile` when the file as a whole cannot be used
(unreadable, unknown format, missing columns).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lmsys.data import schema

log = logging.getLogger(__name__)

FORMATS = ("auto", "kaggle", "arena33k", "ultrafeedback")
MAX_TURN_CHARS = 200_000    # a turn longer than this is not a chat answer (a 1 MB blob is quarantined)


class UnusableFile(ValueError):
    """The file as a whole cannot be used (unreadable, missing columns)."""


class RowError(ValueError):
    """One row is unusable; the message is its quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class Validated:
    clean: pd.DataFrame                      # canonical table
    quarantine: pd.DataFrame                 # original columns + row + reason + detail
    warnings: dict[str, int] = field(default_factory=dict)
    fmt: str = ""

    def report(self) -> dict:
        reasons = self.quarantine["reason"].value_counts().to_dict() if len(self.quarantine) else {}
        return {"format": self.fmt,
                "rows_in": len(self.clean) + len(self.quarantine),
                "rows_clean": len(self.clean),
                "rows_quarantined": len(self.quarantine),
                "reasons": {k: int(v) for k, v in sorted(reasons.items())},
                "warnings": dict(sorted(self.warnings.items()))}


# ---------------------------------------------------------------- reading whole files

def read_raw(path: str | Path) -> pd.DataFrame:
    """Read csv / parquet / json / jsonl into a DataFrame of raw values (strings kept as text)."""
    path = Path(path)
    if not path.exists():
        raise UnusableFile(f"{path}: no such file")
    if path.is_dir():
        raise UnusableFile(f"{path}: is a directory, not a data file")
    if path.stat().st_size == 0:
        raise UnusableFile(f"{path}: empty file (0 bytes)")
    name = path.name.lower()
    check_encoding(path)
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith((".jsonl", ".jsonl.gz")):
            return pd.read_json(path, lines=True, dtype=False)
        if name.endswith((".json", ".json.gz")):
            return pd.read_json(path, dtype=False)
        # csv: bytes decoded per cell later, so one bad cell quarantines one row, not the file
        return pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[],
                           encoding="utf-8-sig", encoding_errors="surrogateescape")   # -sig: a UTF-8 BOM is not text
    except Exception as e:  # noqa: BLE001 - any parser failure means the file is unusable
        raise UnusableFile(f"{path}: cannot read as {path.suffix or 'csv'}: {e}") from e


BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "UTF-32 BE"),
        (b"\xff\xfe", "UTF-16 LE"), (b"\xfe\xff", "UTF-16 BE"))


def check_encoding(path: Path) -> None:
    """Text files are read as UTF-8 (a UTF-8 byte-order mark is skipped): raise UnusableFile naming
    the encoding of a UTF-16 / UTF-32 file (by its byte-order mark, or the NUL bytes of one without),
    which would otherwise read as garbage columns. Parquet and gzip files are binary: not checked."""
    if path.name.lower().endswith((".parquet", ".gz")):
        return
    with open(path, "rb") as f:
        head = f.read(4096)
    found = next((name for bom, name in BOMS if head.startswith(bom)), None)
    if found is None and b"\x00" in head:
        found = "UTF-16 or UTF-32 (NUL bytes, no byte-order mark)"
    if found:
        raise UnusableFile(f"{path}: text encoded as {found}; save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8 "
                           f"{path.name} > {path.stem}.utf8{path.suffix}`)")


def detect_format(df: pd.DataFrame, path: Path) -> str:
    """The format from the columns alone, never the file name: the 33k conversations, or the Kaggle
    schema (UltraFeedback in the LMSYS schema has the same columns: name it with
    fmt="ultrafeedback" or let the table it feeds say so). Raises UnusableFile for the raw
    UltraFeedback release (convert it with `lmsys convert-ut` first) and for unknown columns."""
    cols = set(df.columns)
    if cols & {"conversation_a", "conversation_b"}:
        return "arena33k"
    if cols & {"prompt", "response_a", "response_b"}:       # missing ones are named by check_columns
        return "kaggle"
    if {"instruction", "completions"} <= cols or {"chosen", "rejected"} <= cols:
        raise UnusableFile(f"{path}: the raw UltraFeedback release (columns {sorted(cols)[:6]}...): convert it "
                           f"to the competition format with `lmsys convert-ut {path} --out FILE` first")
    raise UnusableFile(f"{path}: unknown format: columns {sorted(cols)} match neither the Kaggle "
                       f"schema ({schema.KAGGLE_TEST_COLUMNS}) nor the 33k schema ({schema.ARENA_REQUIRED})")


def check_columns(df: pd.DataFrame, fmt: str, path: Path) -> bool:
    """Raise UnusableFile on missing columns; return whether the file carries labels."""
    need = schema.ARENA_REQUIRED if fmt == "arena33k" else schema.KAGGLE_TEST_COLUMNS
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UnusableFile(f"{path}: missing columns {missing} for format {fmt}")
    if fmt == "arena33k":
        return True
    winners = [c for c in schema.WINNER_COLUMNS if c in df.columns]
    if winners and len(winners) != 3:
        raise UnusableFile(f"{path}: has {winners} but not all of {schema.WINNER_COLUMNS}")
    if not winners and "label" in df.columns:      # labelled, but not in the competition's columns
        raise UnusableFile(f"{path}: has a `label` column but not the winner columns {schema.WINNER_COLUMNS}: write the "
                           "label as those three 0/1 columns, or drop `label` for an unlabelled (test) file")
    return bool(winners)


# ---------------------------------------------------------------- one row

def _text(value, what: str) -> str:
    """A turn: None -> '' (kept, counted as a warning by the caller); must be valid UTF-8."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("bad_json", f"{what}: turn is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError("bad_utf8", f"{what}: text is not valid UTF-8") from None
    if len(value) > MAX_TURN_CHARS:
        raise RowError("too_long", f"{what}: a turn of {len(value)} characters (limit {MAX_TURN_CHARS})")
    return value


def _turns(raw, what: str, warn: dict) -> list[str]:
    """A JSON list of strings/nulls (string cell) or an already-decoded list -> list[str]."""
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise RowError("bad_utf8", f"{what}: bytes are not valid UTF-8") from None
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RowError("bad_json", f"{what}: {e.msg} at char {e.pos}") from None
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, list):
        raise RowError("bad_json", f"{what}: not a JSON list")
    nulls = sum(v is None for v in raw)
    if nulls:
        warn["null_turn"] = warn.get("null_turn", 0) + nulls
    return [_text(v, what) for v in raw]


def _kaggle_row(r: dict, labelled: bool, warn: dict) -> dict:
    prompt = _turns(r["prompt"], "prompt", warn)
    a = _turns(r["response_a"], "response_a", warn)
    b = _turns(r["response_b"], "response_b", warn)
    label = schema.UNLABELLED
    if labelled:
        flags = []
        for c in schema.WINNER_COLUMNS:
            v = str(r[c]).strip()
            if v not in ("0", "1", "0.0", "1.0", "True", "False"):
                raise RowError("bad_label", f"{c}={r[c]!r} is not 0/1")
            flags.append(v in ("1", "1.0", "True"))
        if sum(flags) != 1:
            raise RowError("winner_count", f"{sum(flags)} winner flags set, need exactly 1")
        label = flags.index(True)
    return {"model_a": _name(r.get("model_a")), "model_b": _name(r.get("model_b")),
            "prompt": prompt, "response_a": a, "response_b": b, "label": label}


def _name(value) -> str:
    """A model name cell: missing (None, or NaN where a JSON reader filled a null) -> ''."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _conversation(raw, what: str, warn: dict) -> tuple[list[str], list[str]]:
    """[{role, content}, ...] -> (user turns, assistant turns)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RowError("bad_json", f"{what}: {e.msg}") from None
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise RowError("bad_json", f"{what}: not a list of {{role, content}}")
    users, bots = [], []
    for m in raw:
        role, content = m.get("role"), m.get("content")
        if content is None:
            warn["null_turn"] = warn.get("null_turn", 0) + 1
        if role == "user":
            users.append(_text(content, what))
        elif role == "assistant":
            bots.append(_text(content, what))
        else:
            raise RowError("bad_json", f"{what}: unknown role {role!r}")
    return users, bots


def _arena_row(r: dict, warn: dict) -> dict:
    pa, a = _conversation(r["conversation_a"], "conversation_a", warn)
    pb, b = _conversation(r["conversation_b"], "conversation_b", warn)
    if pa != pb:
        raise RowError("prompt_mismatch", "conversation_a and conversation_b have different user turns")
    winner = r.get("winner")
    if winner not in schema.ARENA_WINNER_TO_LABEL:
        raise RowError("bad_label", f"winner={winner!r} not in {sorted(schema.ARENA_WINNER_TO_LABEL)}")
    return {"model_a": _name(r.get("model_a")), "model_b": _name(r.get("model_b")),
            "prompt": pa, "response_a": a, "response_b": b, "label": schema.ARENA_WINNER_TO_LABEL[winner]}


def _check_shape(row: dict) -> None:
    n = len(row["prompt"])
    if n == 0:
        raise RowError("empty_conversation", "no turns")
    if not (len(row["response_a"]) == len(row["response_b"]) == n):
        raise RowError("turn_mismatch", f"turns: prompt {n}, response_a {len(row['response_a'])}, "
                                        f"response_b {len(row['response_b'])}")
    for side in ("response_a", "response_b"):
        if not any(t.strip() for t in row[side]):
            raise RowError("empty_response", f"{side} is empty in every turn")
    if not any(t.strip() for t in row["prompt"]):
        raise RowError("empty_conversation", "prompt is empty in every turn")


def _check_bytes(r: dict) -> None:
    """Every text cell of the raw row must be valid UTF-8 (the csv reader keeps bad bytes as
    surrogates): one bad cell, in any column, quarantines its row instead of crashing a writer."""
    for col, v in r.items():
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError("bad_utf8", f"{col}: bytes are not valid UTF-8") from None


# An integer id as the Kaggle files write it: ASCII digits, optionally with the `.0` tail of an id
# that pandas wrote as a float. Not int()'s wider rule: it reads Arabic-Indic or full-width digits,
# `1_000` and `+42` as numbers, which then collide with genuine ids (`١٢٣` would answer for 123).
INTEGER_ID = re.compile(r"[0-9]+(\.0+)?")


def _row_id(raw_id, integer: bool) -> str:
    if raw_id is None or (isinstance(raw_id, float) and pd.isna(raw_id)) or str(raw_id).strip() == "":
        raise RowError("missing_id", "id is empty")
    text = str(raw_id).strip()
    if integer:
        if not INTEGER_ID.fullmatch(text):
            raise RowError("bad_id", f"id {text!r} is not an integer")
        text = str(int(text.split(".")[0]))
    return text


# ---------------------------------------------------------------- the whole file

def validate_file(path: str | Path, fmt: str = "auto", source: str | None = None) -> Validated:
    """Validate and normalise one file. See the module docstring for formats and errors."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UnusableFile(f"unknown format {fmt!r}; choose from {FORMATS}")
    raw = read_raw(path)
    fmt = detect_format(raw, path) if fmt == "auto" else fmt
    labelled = check_columns(raw, fmt, path)
    id_col = "question_id" if fmt == "arena33k" else "id"
    src = source or {"kaggle": "kaggle", "ultrafeedback": "ultrafeedback", "arena33k": "arena33k"}[fmt]

    warn: dict[str, int] = {}
    clean, bad, seen = [], [], {}
    for i, r in enumerate(raw.to_dict("records")):
        try:
            _check_bytes(r)
            rid = _row_id(r.get(id_col), integer=fmt != "arena33k")
            row = _arena_row(r, warn) if fmt == "arena33k" else _kaggle_row(r, labelled, warn)
            _check_shape(row)
            if rid in seen:
                raise RowError("duplicate_id", f"id {rid} already used by row {seen[rid]}")
            seen[rid] = i
            clean.append({"id": rid, "source": src, **row})
        except RowError as e:
            bad.append({**{k: _printable(v) for k, v in r.items()}, "row": i, "reason": e.reason, "detail": e.detail})
    if warn.get("null_turn"):
        log.warning("%s: %d null turns kept as empty strings", path, warn["null_turn"])
    table = pd.DataFrame(clean, columns=schema.CANONICAL_COLUMNS) if clean else schema.empty_table()
    table["label"] = table["label"].astype("int64")
    quarantine = pd.DataFrame(bad, columns=[*raw.columns, "row", "reason", "detail"])
    return Validated(table, quarantine, warn, fmt)


def _printable(v):
    """Quarantine CSV cell: lists/dicts as JSON, undecodable bytes escaped (nothing is dropped)."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    return v


def fallback_rows(v: Validated) -> pd.DataFrame:
    """Quarantined rows that still need an answer (a test row unusable as text still needs a row in
    the submission): id (as a clean row's id would read; a non-integer id as its stripped text),
    row, reason, detail. A row without an id is answered as id "" (so every row of the file has an
    answer, and the warning names it); repeated ids are left out (the first row answers them).
    Empty frame when nothing is quarantined."""
    cols = ["id", "row", "reason", "detail"]
    q = v.quarantine
    id_col = "question_id" if "question_id" in q.columns and "id" not in q.columns else "id"
    if not len(q) or id_col not in q.columns:
        return pd.DataFrame(columns=cols)
    out = []
    for r in q.to_dict("records"):
        if r["reason"] == "duplicate_id":
            continue
        try:
            rid = _row_id(r[id_col], integer=v.fmt != "arena33k")
        except RowError:
            rid = _raw_text(r[id_col])
        out.append({"id": _printable(rid), "row": int(r["row"]), "reason": r["reason"], "detail": r["detail"]})
    df = pd.DataFrame(out, columns=cols)
    return df[~df["id"].isin(set(v.clean["id"]))].drop_duplicates("id").reset_index(drop=True)


def _raw_text(value) -> str:
    """An id cell that is not a valid id, as text: "" for an empty cell (None, NaN, blanks)."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value).strip()


def raw_ids(path: str | Path) -> list[str]:
    """The distinct ids of a Kaggle-schema file read straight from its `id` column, as a clean row's
    id would read (a non-integer id as its stripped text; an empty cell as ""), first occurrence
    order. Independent of row validation: the final check of a submission compares against these.
    Raises UnusableFile when the file cannot be read or has no `id` column."""
    raw = read_raw(path)
    if "id" not in raw.columns:
        raise UnusableFile(f"{path}: no `id` column")
    out: dict[str, None] = {}
    for value in raw["id"]:
        try:
            rid = _row_id(value, integer=True)
        except RowError:
            rid = _raw_text(value)
        out.setdefault(_printable(rid), None)
    return list(out)
