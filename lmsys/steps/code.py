"""A step's code: the import closure of its module inside the project, computed, never listed.

`closure("lmsys.steps.serve")` scans the module's source (AST, every `import` and `from ... import`,
module level and inside functions), keeps the project's modules (`lmsys.*`), and follows them
transitively; a package's `__init__` counts wherever one of its modules is imported. `code_hash`
hashes those files' bytes: the Prefect cache key and the DVC deps both use it, so editing any module
a step can run reruns that step and nothing that cannot run it.

Files are read, never imported: hashing a cached step must not pay the torch imports (seconds).
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PROJECT = "lmsys"                              # the top-level package whose modules are a step's code
SOURCE_ROOT = Path(__file__).resolve().parents[2]   # the directory holding lmsys/


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The source file of project module `name` under `root` (a module or a package's __init__), or None."""
    base = Path(root or SOURCE_ROOT, *name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _packages(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: importing a module runs every package __init__ above it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imported(tree: ast.AST, name: str, is_package: bool, root: Path) -> set[str]:
    """Project modules that the module `name` (parsed as `tree`) imports anywhere in its body."""
    found: set[str] = set()
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                     # relative: from the package `level` steps up
                pkg = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*pkg, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", root))
    return {m for f in found if f.split(".")[0] == PROJECT for m in _packages(f) if module_file(m, root)}


@lru_cache(maxsize=None)
def _closure(name: str, root: Path, stamp: tuple) -> tuple[str, ...]:
    seen, todo = set(), [name, *_packages(name)]
    while todo:
        mod = todo.pop()
        path = module_file(mod, root)
        if mod in seen or path is None:
            continue
        seen.add(mod)
        todo += sorted(_imported(ast.parse(path.read_bytes(), str(path)), mod, path.name == "__init__.py", root))
    return tuple(sorted(seen))


def closure(name: str, root: Path | None = None) -> list[str]:
    """Every project module that module `name` can import (itself and its packages included), sorted."""
    root = Path(root or SOURCE_ROOT).resolve()
    return list(_closure(name, root, _tree_stamp(root)))


def _tree_stamp(root: Path) -> tuple:
    """(path, mtime_ns, size) of every project source file: the closure cache's key (an edit drops it)."""
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted((root / PROJECT).rglob("*.py")))


def code_files(module: str, root: Path | None = None) -> list[Path]:
    """The source files of `closure(module)`."""
    return [module_file(m, root) for m in closure(module, root)]


def code_hash(module: str, root: Path | None = None) -> str:
    """sha256 over the names and bytes of every file in `closure(module)`."""
    h = hashlib.sha256()
    for name in closure(module, root):
        h.update(name.encode())
        h.update(module_file(name, root).read_bytes())
    return h.hexdigest()
