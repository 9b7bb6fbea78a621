"""The Prefect side of the Hugging Face token: the Secret block `hf-token` on the configured server.
`use_prefect_secret()` adds it to lmsys.secrets' sources (the CLI, the flow and every task call it;
it lives beside the tasks, the lowest layer that knows Prefect, so tasks/ imports nothing of flows/)."""
from __future__ import annotations

import logging
import os

from lmsys import secrets

log = logging.getLogger(__name__)


def prefect_secret() -> str | None:
    """The Secret block's value, or None: no Prefect API configured, or no such block (the normal case)."""
    if not os.environ.get("PREFECT_API_URL"):
        return None
    try:
        from prefect.blocks.system import Secret
        return Secret.load(secrets.SECRET_BLOCK, _sync=True).get()
    except Exception as e:  # noqa: BLE001 - no block is the normal case; say so without details
        log.debug("no Prefect Secret block %r (%s)", secrets.SECRET_BLOCK, type(e).__name__)
        return None


def use_prefect_secret() -> None:
    """Let lmsys.secrets.hf_token fall back on the Prefect Secret block."""
    secrets.add_source(prefect_secret)
