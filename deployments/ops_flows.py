"""Operations flows deployed beside the pipeline (see deployments/deploy.py and README.md):

- `rerun_if_data_changed` (cron): runs the pipeline only when the content hashes of its data files
  differ from the record the last successful run wrote (artifacts/<profile>/data_state.json);
  otherwise it finishes at once, saying so (no task, no subflow).
- `ingest_new_data` (event `lmsys.data.added`, emitted by `lmsys data add`): runs the pipeline
  with the new file joined to the data the default configuration uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import flow_config, pipeline
from flows.runners import make_task_runner
from lmsys.config import ProfileName, ROOT, load_config
from lmsys.paths import Layout
from stages import lineage

LOCAL = {"orchestration.runner": "local"}


def _run_pipeline(**params) -> dict:
    """The pipeline (its flow parameters: `params`) as a subflow on the local runner."""
    params["overrides"] = {**(params.get("overrides") or {}), **LOCAL}
    return pipeline.with_options(task_runner=make_task_runner(flow_config(**params)))(**params)


@flow(name="lmsys-rerun-if-data-changed", log_prints=True)
def rerun_if_data_changed(profile: ProfileName = "tiny",
                          train: str | None = None, test: str | None = None,
                          external: list[str] | None = None, ut: str | None = None,
                          overrides: dict | None = None) -> dict:
    """Scheduled: rerun the pipeline when its data files changed since the last successful run."""
    logger = get_run_logger()
    params = {"profile": profile, "train": train, "test": test, "external": external, "ut": ut, "overrides": overrides}
    cfg = flow_config(**params)
    changed, why = lineage.data_changed(cfg)
    if not changed:
        logger.info("%s: nothing to do", why)
        create_markdown_artifact(f"Nothing to do: {why}.\n", key="lmsys-rerun", description="scheduled rerun")
        return {"ran": False, "reason": why}
    logger.info("%s: running the pipeline", why)
    out = _run_pipeline(**params)
    create_markdown_artifact(f"Reran the pipeline: {why}.\n", key="lmsys-rerun", description="scheduled rerun")
    return {"ran": True, "reason": why, **out}


@flow(name="lmsys-ingest-new-data", log_prints=True)
def ingest_new_data(path: str, kind: Literal["train", "external", "ut", "test"] = "external",
                    profile: ProfileName = "tiny", overrides: dict | None = None) -> dict:
    """Event-triggered: the pipeline with the added file. external: joins the configured external
    files; train / ut / test: replaces that table's file (the other tables stay as configured)."""
    from lmsys.steps.prepare import data_files, uses_demo
    from lmsys.steps.recipe import run_step
    logger = get_run_logger()
    new = Path(path) if Path(path).is_absolute() else ROOT / path
    if not new.exists():
        raise FileNotFoundError(f"{new} does not exist (was it added on another machine? `dvc pull` it)")
    base = load_config(profile, overrides)
    layout = Layout.of(base)
    files = data_files(base, layout)
    if uses_demo(base) and not all(p.exists() for fs in files.values() for p in fs):
        logger.info("the demo data the new file joins is missing: generating it")
        run_step("demo-data", base, layout)
    data = {"train": str(files["train"][0]) if files["train"] else None,
            "test": str(files["test"][0]) if files["test"] else None,
            "external": [str(p) for p in files["external"]],
            "ut": str(files["ut"][0]) if files["ut"] else None}
    if kind == "external":
        data["external"] = [*data["external"], str(new)]
    else:
        data[kind] = str(new)
    if uses_demo(base) and kind != "test":      # the demo's test set stays: so do its labels (step 9's test metrics)
        from lmsys.data.demo import demo_paths
        overrides = {**(overrides or {}), "data.test_labels": str(demo_paths(layout.demo_dir)["test_labels"])}
    logger.info("running the pipeline with %s as %s: %s", new.name, kind, data)
    data["external"] = data["external"] or None
    out = _run_pipeline(profile=profile, overrides=overrides, **data)
    return {"added": str(new), "kind": kind, "data": data, **out}
