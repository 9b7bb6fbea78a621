"""The Hugging Face token: from the environment (HF_TOKEN) or a Prefect Secret block named
`hf-token`. It is only ever handed to `from_pretrained(token=...)`: never printed, logged, put in
an exception message or written to an artifact (tests/test_secrets.py greps for it)."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
SECRET_BLOCK = "hf-token"


def hf_token(explicit: str | None = None) -> str | None:
    """explicit, else $HF_TOKEN, else the Prefect Secret block (only when a Prefect API is configured)."""
    if explicit:
        return explicit
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    if not os.environ.get("PREFECT_API_URL"):
        return None
    try:
        from prefect.blocks.system import Secret
        return Secret.load(SECRET_BLOCK, _sync=True).get()
    except Exception as e:  # noqa: BLE001 - no block is the normal case; say so without details
        log.debug("no Prefect Secret block %r (%s)", SECRET_BLOCK, type(e).__name__)
        return None
