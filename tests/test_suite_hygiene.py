"""The suite's own guarantees: Hypothesis derandomised under CI, one random-order pass in CI."""
from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import settings

from pinned import pinned_import

ROOT = Path(__file__).resolve().parent.parent


def test_hypothesis_ci_profile_is_derandomised():
    ci = settings.get_profile("ci")
    assert ci.derandomize is True and ci.database is None
    if os.environ.get("CI") == "true" and not os.environ.get("HYPOTHESIS_PROFILE"):
        assert settings.default.derandomize is True and settings.default.database is None


def test_ci_runs_the_suite_in_random_order():
    pinned_import("random_order", "pytest-random-order")
    script = (ROOT / "scripts" / "run-tests.sh").read_text()
    assert re.search(r'^python -m pytest .*"\$\{PYTEST_ORDER:---random-order-bucket=module\}" "\$@"$', script, re.M), script
    assert "./scripts/run-tests.sh" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^pytest-random-order==\S+$", (ROOT / "requirements.lock").read_text(), re.M)
