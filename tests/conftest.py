"""Shared fixtures. `shared_data` finds ../shared/data: missing -> skip with a reason, but fail under CI=true."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")            # nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Hypothesis: under CI the examples are derandomised (a fixed seed per test, no example database), so
# a CI failure reproduces and a green CI run is not luck; elsewhere random, with the local database.
# HYPOTHESIS_PROFILE=ci picks the CI profile by hand.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev"))


def _shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        msg = f"{p} is missing (../shared is laid beside the repo in CI)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture
def shared_data():
    """Callable: shared_data('vicuna80_human.csv') -> Path."""
    return lambda name: _shared(f"data/{name}")


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """The tiny models' tokenizer: a byte-level BPE (vocab 300) trained on train_worker.corpus()."""
    from lmsys.models import train_tokenizer
    from train_worker import corpus
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(), d, vocab_size=300)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    """That tokenizer loaded as the pipeline loads a tiny model's (pad token, right padding)."""
    from lmsys.models import load_tokenizer
    return load_tokenizer({"kind": "tiny-llama"}, tok_dir)


@pytest.fixture(scope="session")
def final_model(tok, tmp_path_factory):
    """A merged tiny model dir as step 6 writes it: weights, tokenizer, ensemble.json with the class prior
    and serving.json (float32: served on this CPU)."""
    import json
    from lmsys import target
    from lmsys.models import build_base_model
    d = tmp_path_factory.mktemp("final")
    build_base_model({"kind": "tiny-llama", "hidden": 32, "layers": 1, "heads": 2}, tok).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "ensemble.json").write_text(json.dumps({"method": "mean", "class_prior": [0.5, 0.3, 0.2]}))
    served = target.Target(None, 1, None, "float32", "tests: a CPU")
    (d / target.RECORD).write_text(json.dumps(target.record(served)))
    return d


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small demo competition, generated once per test session."""
    from lmsys.data.demo import make_demo_data
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, rows=300, test_rows=60, external_rows=80, ut_rows=100, seed=0)
    return out


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Every test compiles (flex attention, regional compiles) afresh: after one shape dynamo recompiles
    the next with dynamic shapes, and inductor's CPU flex-attention template then fails to build
    (CppCompileError: 'cur_qSplitSize8' was not declared, torch 2.13), so a test's outcome would depend
    on the tests before it. The CPU only stands in for the GPU there (CPU steps take the padded path)."""
    import sys
    if "torch" in sys.modules:
        sys.modules["torch"]._dynamo.reset()
    yield
