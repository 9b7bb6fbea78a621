"""Step 0: data. `demo_data` writes the embedded demo competition; `prepare` validates every
input file, quarantines bad rows, dedupes, removes external rows that leak competition rows,
and writes the canonical tables the later steps read.

Accounting (report.json), per file: rows_in == rows_clean + rows_quarantined, and
rows_clean == rows_used + rows_removed (removed = duplicates, leaks, id collisions).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from lmsys.data import demo, transforms
from lmsys.data.schema import empty_table
from lmsys.data.validate import validate_file
from lmsys.io import write_json, write_table
from lmsys.paths import Layout
from lmsys.steps import Step, StepResult, register

log = logging.getLogger(__name__)
TABLES = ("train", "test", "external", "ut")   # prepared/<name>.parquet


def uses_demo(cfg: dict) -> bool:
    return cfg["data"]["train"] is None


def data_files(cfg: dict, layout: Layout) -> dict[str, list[Path]]:
    """Input files per table: the configured paths, or the demo data's when data.train is null."""
    if uses_demo(cfg):
        p = demo.demo_paths(layout.demo_dir)
        return {"train": [p["train"]], "test": [p["test"]], "external": [p["external"]], "ut": [p["ut"]]}
    d = cfg["data"]

    def as_list(v):
        return [] if v is None else [Path(x) for x in (v if isinstance(v, list) else [v])]
    return {"train": as_list(d["train"]), "test": as_list(d["test"]),
            "external": as_list(d["external"]), "ut": as_list(d["ut"])}


def run_demo_data(cfg: dict, layout: Layout) -> StepResult:
    d = cfg["demo"]
    paths = demo.make_demo_data(layout.demo_dir, rows=d["rows"], test_rows=d["test_rows"],
                                external_rows=d["external_rows"], ut_rows=d["ut_rows"], seed=d["seed"])
    return StepResult(outputs=[layout.demo_dir], metrics={"files": {k: str(v) for k, v in paths.items()}})


def _read_table(files: list[Path], name: str, out: Path, report: dict) -> pd.DataFrame:
    parts = []
    for f in files:
        source = {"train": "kaggle", "test": "kaggle", "ut": "ultrafeedback"}.get(name)
        v = validate_file(f, source=source)
        report["files"][str(f)] = v.report()
        if len(v.quarantine):
            write_table(v.quarantine, out / f"quarantine_{name}_{Path(f).stem}.csv")
            log.warning("%s: %d rows quarantined %s", f, len(v.quarantine), v.report()["reasons"])
        parts.append(v.clean)
    return pd.concat(parts, ignore_index=True) if parts else empty_table()


def run_prepare(cfg: dict, layout: Layout) -> StepResult:
    out = layout.prepared
    files = data_files(cfg, layout)
    report: dict = {"files": {}, "removed": {}}
    tables = {name: _read_table(files[name], name, out, report) for name in TABLES}
    if not len(tables["train"]):
        raise ValueError("no usable competition training rows; see the quarantine files in " + str(out))
    removed = []
    for name in ("train", "external", "ut"):
        if len(tables[name]):
            tables[name], dup = transforms.dedupe(tables[name])
            removed.append(dup.assign(table=name))
    if len(tables["external"]):
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
    return StepResult(outputs=[out], metrics=report["rows_used"])


register(Step(name="demo-data", number="0", run=run_demo_data,
              inputs=lambda cfg, layout: [],
              outputs=lambda cfg, layout: [layout.demo_dir],
              params=("demo",), modules=("lmsys.data.demo", "lmsys.steps.prepare")))

register(Step(name="prepare", number="0", run=run_prepare,
              inputs=lambda cfg, layout: [p for fs in data_files(cfg, layout).values() for p in fs],
              outputs=lambda cfg, layout: [layout.prepared],
              params=("data",),
              modules=("lmsys.data.validate", "lmsys.data.transforms", "lmsys.data.schema", "lmsys.steps.prepare")))
