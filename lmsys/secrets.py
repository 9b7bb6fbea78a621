"""The Hugging Face token: explicit, else the environment (HF_TOKEN), else a source the outer layer
added (the orchestration side adds the Prefect Secret block `hf-token`: tasks/secrets.py). It is
only ever handed to `from_pretrained(token=...)`: never printed, logged, put in an exception message
or written to an artifact (tests/orchestration/test_secrets.py greps for it).

The library imports no orchestrator: SOURCES is how one is consulted without being imported here.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

log = logging.getLogger(__name__)
SECRET_BLOCK = "hf-token"                      # the name the orchestration side stores the token under
SOURCES: list[Callable[[], str | None]] = []   # further places to look, in order (each returns None when it has none)


def hf_token(explicit: str | None = None) -> str | None:
    """explicit, else $HF_TOKEN, else the first of SOURCES that has one."""
    if explicit:
        return explicit
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    for source in SOURCES:
        token = source()
        if token:
            return token
    return None


def add_source(source: Callable[[], str | None]) -> None:
    """Consult `source` after the environment (once, however often it is added)."""
    if source not in SOURCES:
        SOURCES.append(source)
