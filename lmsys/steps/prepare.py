"""Step 0: data. `demo_data` writes the embedded demo competition; `prepare` validates every
input file, quarantines bad rows, dedupes, removes external rows that leak competition rows,
and writes the canonical tables the later steps read. External (33k) rows are deduplicated on
the prompt, as the recipe does (one battle per prompt). Test rows that are quarantined still need
an answer: they are listed in test_fallback.csv (id, row, reason) for the predict step.

Accounting (report.json), per file: rows_in == rows_clean + rows_quarantined, and
rows_clean == rows_used + rows_removed (removed = duplicates, leaks, id collisions).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from lmsys.data import crosscheck, demo, transforms
from lmsys.data.schema import empty_table, prompt_key
from lmsys.data.validate import fallback_rows, validate_file
from lmsys.io import atomic_dir, write_json, write_table
from lmsys.paths import Layout
from lmsys.steps import StepResult

log = logging.getLogger(__name__)
TABLES = ("train", "test", "external", "ut")   # prepared/<name>.parquet


FALLBACK_COLUMNS = ["id", "row", "reason", "detail", "file"]


def uses_demo(cfg: dict) -> bool:
    return cfg["data"]["train"] is None


def check_demo_allowed(cfg: dict) -> None:
    """The `full` profile trains 70B teachers: on the demo data that is a mistake, not a default.
    Raises ValueError when profile full would use the demo data and data.allow_demo is not true."""
    if cfg["profile"] == "full" and uses_demo(cfg) and not cfg["data"].get("allow_demo"):
        raise ValueError("profile full has no data.train set and would train on the demo data: set "
                         "data.train/data.test (--set data.train=PATH ...), or --set data.allow_demo=true "
                         "to run full on the demo on purpose")


def data_files(cfg: dict, layout: Layout) -> dict[str, list[Path]]:
    """Input files per table: the configured paths, or the demo data's when data.train is null."""
    if uses_demo(cfg):
        p = demo.demo_paths(layout.demo_dir)
        return {"train": [p["train"]], "test": [p["test"]], "external": [p["external"]], "ut": [p["ut"]]}
    d = cfg["data"]

    def as_list(v):
        return [] if v is None else [Path(x) for x in (v if isinstance(v, list) else [v])]
    return {"train": as_list(d["train"]), "test": [] if crosscheck.skips_predict(cfg) else as_list(d["test"]),
            "external": as_list(d["external"]), "ut": as_list(d["ut"])}


def run_demo_data(cfg: dict, layout: Layout) -> StepResult:
    check_demo_allowed(cfg)
    d = cfg["demo"]
    with atomic_dir(layout.demo_dir) as staged:      # one set: a kill midway leaves the last whole set or none
        demo.make_demo_data(staged, rows=d["rows"], test_rows=d["test_rows"],
                            external_rows=d["external_rows"], ut_rows=d["ut_rows"], seed=d["seed"])
    paths = demo.demo_paths(layout.demo_dir)
    return StepResult(outputs=[layout.demo_dir], metrics={"files": {k: str(v) for k, v in paths.items()}})


def _read_table(files: list[Path], name: str, out: Path, report: dict, seen: dict) -> pd.DataFrame:
    """The clean rows of table `name`'s files; quarantine files written to `out`; each file's ids and
    whether it is labelled added to `seen` (for the checks across files, lmsys.data.crosscheck)."""
    parts, fallback = [], []
    for f in files:
        source = {"train": "kaggle", "test": "kaggle", "ut": "ultrafeedback"}.get(name)
        v = validate_file(f, source=source)
        report["files"][str(f)] = v.report()
        if len(v.quarantine):
            write_table(v.quarantine, out / f"quarantine_{name}_{Path(f).stem}.csv")
            log.warning("%s: %d rows quarantined %s", f, len(v.quarantine), v.report()["reasons"])
        parts.append(v.clean)
        fb = fallback_rows(v) if name == "test" else None
        if fb is not None:
            fallback.append(fb.assign(file=str(f)))
        seen["ids"].setdefault(name, []).append((str(f), crosscheck.file_ids(v.clean, fb)))
        seen["labelled"].setdefault(name, []).append((str(f), crosscheck.has_labels(v.clean)))
    if name == "test":
        _write_test_fallback(fallback, out, report)
    return pd.concat(parts, ignore_index=True) if parts else empty_table()


def _write_test_fallback(parts: list[pd.DataFrame], out: Path, report: dict) -> None:
    """test_fallback.csv: quarantined test rows that still get a row in the submission (the predict
    step answers them with the training class prior), with the reason; counted in the report."""
    fb = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=FALLBACK_COLUMNS)
    fb = fb.reindex(columns=FALLBACK_COLUMNS).drop_duplicates("id")
    write_table(fb, out / "test_fallback.csv")
    report["test_fallback"] = {"rows": len(fb), "reasons": {k: int(n) for k, n in fb["reason"].value_counts().items()}}
    if len(fb):
        log.warning("%d test rows are unusable as text and will be answered by the class prior: %s",
                    len(fb), report["test_fallback"]["reasons"])


def dedupe_prompts(external: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The recipe's 33k deduplication: one battle per prompt (the first kept); the others come back
    with reason `duplicate_prompt`."""
    dup = external["prompt"].map(prompt_key).duplicated(keep="first")
    return external[~dup].reset_index(drop=True), external[dup].assign(reason="duplicate_prompt").reset_index(drop=True)


def run_prepare(cfg: dict, layout: Layout) -> StepResult:
    """Step D2, its outputs written as one set: everything goes to a staged directory that replaces
    prepared/ whole when all is written (lmsys.io.atomic_dir), so a stopped prepare leaves the last
    complete set, and nothing of an earlier run (a quarantine file of a file no longer listed)
    survives a new one. Raises ValueError for problems across the files (lmsys.data.crosscheck) and
    when no competition training row is usable, before anything is published."""
    check_demo_allowed(cfg)
    with atomic_dir(layout.prepared) as staged:
        result = _prepare(cfg, layout, staged)
    return StepResult(outputs=[layout.prepared], metrics=result)


def _prepare(cfg: dict, layout: Layout, out: Path) -> dict:
    """run_prepare's work, writing into `out` (the staged directory); returns the step's metrics."""
    files = data_files(cfg, layout)
    report: dict = {"files": {}, "removed": {}}
    seen: dict = {"ids": {}, "labelled": {}}
    tables = {name: _read_table(files[name], name, out, report, seen) for name in TABLES}
    clashes = crosscheck.problems(cfg, seen["ids"], seen["labelled"])
    if clashes:
        raise ValueError("; ".join(clashes))
    if not len(tables["train"]):
        per_file = "; ".join(f"{f}: {r['rows_in']} rows, {r['reasons'] or 'none quarantined'}"
                             for f, r in report["files"].items() if f in map(str, files["train"]))
        raise ValueError(f"no usable competition training rows ({per_file or 'data.train lists no file'}); "
                         "`lmsys validate FILE` lists each row's reason")
    removed = []
    for name in ("train", "external", "ut"):
        if len(tables[name]):
            tables[name], dup = transforms.dedupe(tables[name])
            removed.append(dup.assign(table=name))
    if len(tables["external"]):
        tables["external"], dup = dedupe_prompts(tables["external"])
        removed.append(dup.assign(table="external"))
        report["external_dedup_prompt"] = {"duplicate_prompts_removed": len(dup), "rows_kept": len(tables["external"])}
        tables["external"], leaks = transforms.remove_leaks(tables["external"], tables["train"])
        clash = tables["external"]["id"].isin(set(tables["train"]["id"]))
        removed += [leaks.assign(table="external"),
                    tables["external"][clash].assign(reason="id_collision", table="external")]
        tables["external"] = tables["external"][~clash].reset_index(drop=True)
    removed = pd.concat([r for r in removed if len(r)], ignore_index=True) if any(len(r) for r in removed) else None
    if removed is not None:
        report["removed"] = {f"{t}:{r}": int(n) for (t, r), n in removed.groupby(["table", "reason"]).size().items()}
        write_table(removed.drop(columns=["prompt", "response_a", "response_b"]), out / "removed.csv")
    report["rows_used"] = {name: len(t) for name, t in tables.items()}
    for name, t in tables.items():
        write_table(t, out / f"{name}.parquet")
    write_json(report, out / "report.json")
    quarantined = sum(f["rows_quarantined"] for f in report["files"].values())
    return {**report["rows_used"], "rows_quarantined": quarantined, "test_fallback_rows": report["test_fallback"]["rows"]}
