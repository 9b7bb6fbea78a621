"""The codebase's shape, checked over the source's syntax trees (nothing is imported): no import
circle (imports inside function bodies count), the layers (tasks/ and stages/ import nothing of
flows/), no one-letter alias of a project module, no test hooks in production code, and no benchmark
that patches a library module instead of calling it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lmsys", "tasks", "flows", "stages", "deployments")
CODE_DIRS = (*PACKAGES, "benchmarks", "tests", "scripts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (module level or in a function): for `from a
    import b`, a.b when that is a module, else a."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]] and cycles({"a": {"b"}, "b": set()}) == []
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from lmsys.cli import main\n    return main\n")
    assert imports_of(f, {"lmsys.cli", "lmsys"}) == {"lmsys.cli"}


def test_no_import_circle_counting_imports_inside_functions():
    graph = import_graph()
    assert "lmsys.cli" in graph and "flows.pipeline" in graph["lmsys.cli"]      # the graph sees function-level imports
    assert cycles(graph) == []


def test_tasks_and_stages_import_nothing_of_flows():
    graph = import_graph()
    up = {m: sorted(d for d in deps if d.split(".")[0] == "flows")
          for m, deps in graph.items() if m.split(".")[0] in ("tasks", "stages")}
    assert {m: d for m, d in up.items() if d} == {}


def test_no_one_letter_alias_of_a_project_module():
    """`import torch.nn.functional as F` may stay; `from lmsys.steps import common as C` may not."""
    found = []
    for d in CODE_DIRS:
        for p in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = getattr(node, "module", None) or ""
                    for a in node.names:
                        full = f"{mod}.{a.name}" if mod else a.name
                        if a.asname and len(a.asname) <= 2 and full.split(".")[0] in PACKAGES:
                            found.append(f"{p.relative_to(ROOT)}: {full} as {a.asname}")
    assert found == []


def test_no_test_hooks_in_production_code():
    pattern = re.compile(r"LMSYS_TASK_DELAY|CODE_ROOT")
    found = [str(p.relative_to(ROOT)) for d in ("lmsys", "tasks", "flows") for p in (ROOT / d).rglob("*.py")
             if pattern.search(p.read_text())]
    assert found == []


def library_attribute_assignments(source: str) -> list[str]:
    """`module.attr = ...` (or setattr(module, ...)) where `module` names an imported module of the project."""
    tree = ast.parse(source)
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            modules |= {a.asname or a.name for a in node.names
                        if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()
                        or (ROOT / node.module.replace(".", "/") / a.name / "__init__.py").exists()}
    hits = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        for t in targets:
            base = t
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(t, ast.Attribute) and isinstance(base, ast.Name) and base.id in modules:
                hits.append(ast.unparse(t))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args \
                and isinstance(node.args[0], ast.Name) and node.args[0].id in modules:
            hits.append(ast.unparse(node))
    return hits


def test_the_patch_finder_sees_module_attribute_assignments():
    src = ("from lmsys import train as trainer\nimport lmsys.models\nfrom lmsys.infer import pad_batch\n"
           "trainer.pad_batch = 1\nlmsys.models.build_base_model = 2\nsetattr(trainer, 'x', 3)\npad_batch.x = 4\n")
    assert library_attribute_assignments(src) == ["trainer.pad_batch", "lmsys.models.build_base_model",
                                                  "setattr(trainer, 'x', 3)"]


def test_no_benchmark_patches_a_library_module():
    found = {str(p.relative_to(ROOT)): library_attribute_assignments(p.read_text())
             for p in (ROOT / "benchmarks").rglob("*.py")}
    assert {f: h for f, h in found.items() if h} == {}


# ---------------------------------------------------------------- every imported name exists

def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, imports), also
    inside top-level if/try/with blocks."""
    names: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                if isinstance(node, (ast.If, ast.Try, ast.With)) or (field == "body" and isinstance(node, ast.ExceptHandler)):
                    visit(getattr(node, field, []) or [])
    visit(ast.parse(path.read_text()).body)
    return names


def missing_imports(files: list[Path], modules: dict[str, Path]) -> list[str]:
    """`from <project module> import NAME` anywhere in `files` (function bodies too: they run only
    when called, so a rename leaves them broken until then) where the module defines no NAME."""
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules and not node.level:
                have = defined_names(modules[node.module])
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                out += [f"{where}:{node.lineno}: {node.module} has no {a.name}" for a in node.names
                        if a.name != "*" and a.name not in have and f"{node.module}.{a.name}" not in modules]
    return out


def test_every_name_imported_from_the_project_exists():
    modules = project_modules()
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
    assert missing_imports(files, modules) == []


def test_the_import_check_sees_a_renamed_function(tmp_path):
    stale = tmp_path / "stale.py"
    stale.write_text("def f():\n    from lmsys.config import set_dotted\n    from lmsys.config import set_in, ROOT\n"
                     "from lmsys.steps import recipe\n")
    assert missing_imports([stale], project_modules()) == ["stale.py:2: lmsys.config has no set_dotted"]
