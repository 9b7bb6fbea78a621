"""tests/gpu: the `gpu` marker's tests. They need a CUDA device; where there is none (this CPU machine,
CI) every test here is skipped and the reason printed in the session header and the skip summary."""
from __future__ import annotations

import pytest


def cuda_reason() -> str | None:
    """None when a CUDA device is usable, else why not."""
    try:
        import torch
    except ImportError as e:                     # pragma: no cover  (torch is in the lock)
        return f"torch cannot be imported: {e}"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}): run scripts/gpu-smoke.sh on a GPU machine"
    return None


def pytest_report_header(config):
    reason = cuda_reason()
    return f"tests/gpu: {'skipped: ' + reason if reason else 'CUDA device present'}"


def pytest_collection_modifyitems(config, items):
    reason = cuda_reason()
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"gpu: {reason}"))
