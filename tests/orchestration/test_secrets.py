"""lmsys.secrets.hf_token against the real test Prefect server: the token comes from an explicit
argument, else $HF_TOKEN, else the Prefect Secret block `hf-token` (the source tasks/secrets.py adds,
as the CLI, the flow and the tasks do); it is never logged."""
from __future__ import annotations

import logging

import pytest

TOKEN = "hf_BLOCKSECRET_do_not_leak_7331"


@pytest.fixture(autouse=True)
def prefect_source(monkeypatch):
    """lmsys.secrets consults the Prefect Secret block for these tests only (as `lmsys` and the tasks do)."""
    from tasks.secrets import use_prefect_secret
    from lmsys import secrets
    monkeypatch.setattr(secrets, "SOURCES", [])
    use_prefect_secret()


@pytest.fixture
def secret_block(prefect_server, monkeypatch):
    """The `hf-token` Secret block saved on the test server for one test, deleted after it."""
    from prefect.blocks.system import Secret

    from lmsys.secrets import SECRET_BLOCK
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    Secret(value=TOKEN).save(SECRET_BLOCK, overwrite=True)
    yield SECRET_BLOCK
    Secret.delete(SECRET_BLOCK)


def test_no_token_anywhere_is_none(prefect_server, monkeypatch):
    from lmsys.secrets import hf_token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    assert hf_token() is None                                  # no block on the server: the normal case


def test_token_from_the_prefect_secret_block(secret_block, monkeypatch, caplog):
    from lmsys.secrets import hf_token
    with caplog.at_level(logging.DEBUG):
        assert hf_token() == TOKEN                             # read from the server's block
        monkeypatch.setenv("HF_TOKEN", "hf_from_env")
        assert hf_token() == "hf_from_env"                     # the environment wins over the block
        assert hf_token("hf_explicit") == "hf_explicit"        # an explicit token wins over both
    assert TOKEN not in caplog.text


def test_block_is_not_read_without_a_prefect_api(secret_block, monkeypatch):
    from lmsys.secrets import hf_token
    monkeypatch.delenv("PREFECT_API_URL")
    assert hf_token() is None
