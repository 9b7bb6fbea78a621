"""Packages pinned in requirements.lock are installed wherever CI runs: under CI=true a test that
cannot import one (or use it) fails; elsewhere it skips with the reason. Skips stay for what CI
genuinely lacks (a GPU), never for a pinned package."""
from __future__ import annotations

import importlib
import os

import pytest


def unavailable(msg: str, module_level: bool = False) -> None:
    """Fail under CI=true, skip (with msg) elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg} (CI=true: every pinned package must be installed and working)", pytrace=False)
    pytest.skip(msg, allow_module_level=module_level)


def pinned_import(module: str, package: str, module_level: bool = False):
    """import_module(module), or unavailable() naming the pinned `package` and the import error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        unavailable(f"package {package} (pinned in requirements.lock) cannot be imported: {e}", module_level)
