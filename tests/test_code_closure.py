"""A step's code is the import closure of its module (lmsys.steps.code), computed from the source:
an edit of a module changes the code hash of exactly the steps that can import it. The edits are
made in a copy of lmsys/ (the repo's files are never touched)."""
from __future__ import annotations

import shutil

import pytest

from lmsys.steps.code import SOURCE_ROOT, closure, code_hash
from lmsys.steps.recipe import RECIPE

# the steps that turn text into token ids (lmsys.text), directly or through lmsys.steps.common
ENCODERS = {"tokenizer", "post-pretrain", "post-pretrain-student", "filter-score", "train-teacher", "teacher-logits",
            "distill", "ensemble", "quantize", "predict", "evaluate"}


@pytest.fixture
def code_copy(tmp_path):
    shutil.copytree(SOURCE_ROOT / "lmsys", tmp_path / "lmsys", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _hashes(root) -> dict[str, str]:
    return {s.name: code_hash(s.module, root) for s in RECIPE}


def _edited(root, module: str) -> set[str]:
    """Steps whose code hash changes when `module`'s file (lmsys/<module>.py) gets a comment."""
    before = _hashes(root)
    f = root / "lmsys" / f"{module}.py"
    f.write_text(f.read_text() + "\n# an edit\n")
    after = _hashes(root)
    return {n for n in before if before[n] != after[n]}


def test_editing_tta_changes_predict_and_evaluate_only(code_copy):
    assert _edited(code_copy, "tta") == {"predict", "evaluate"}


def test_editing_text_changes_the_tokenizer_and_every_step_that_encodes_text(code_copy):
    changed = _edited(code_copy, "text")
    assert ENCODERS <= changed, sorted(ENCODERS - changed)
    assert not changed & {"demo-data", "prepare", "folds"}, changed


def test_every_module_of_the_closure_is_found_function_level_imports_included(tmp_path):
    pkg = tmp_path / "lmsys"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom lmsys.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from lmsys import c\n    from . import d\n    return c, d\n")
    (pkg / "c.py").write_text("import lmsys.e as e\n")
    (pkg / "sub" / "d.py").write_text("")
    (pkg / "e.py").write_text("")
    (pkg / "unused.py").write_text("")
    assert closure("lmsys.a", tmp_path) == ["lmsys", "lmsys.a", "lmsys.c", "lmsys.e", "lmsys.sub", "lmsys.sub.b",
                                            "lmsys.sub.d"]


def test_the_repos_steps_have_their_own_modules_and_the_shared_ones():
    for s in RECIPE:
        c = closure(s.module)
        assert s.module in c and "lmsys.steps" in c and "lmsys.config" in c, (s.name, c)
    assert "lmsys.tta" not in closure("lmsys.steps.student")


def test_the_library_imports_no_orchestrator():
    """Layers: nothing in lmsys/ but cli.py (the outer edge) imports flows, tasks, stages, deployments or
    prefect, at module level or inside a function."""
    import re
    pattern = re.compile(r"^\s*(from|import) (flows|tasks|stages|deployments|prefect)\b", re.M)
    found = {str(p.relative_to(SOURCE_ROOT)): pattern.findall(p.read_text())
             for p in (SOURCE_ROOT / "lmsys").rglob("*.py") if p.name != "cli.py" or p.parent.name != "lmsys"}
    assert {f: m for f, m in found.items() if m} == {}
