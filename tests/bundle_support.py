"""A fresh virtualenv that sees the stack's packages but not the project nor what an exported bundle brings
(tests/test_pipeline_tiny.py: `lmsys export`, then predict from the bundle alone).

The venv's .pth file names a directory of links to this environment's site-packages minus the bundled
distributions (and minus the project's editable install). A directory named by a .pth line is a plain
sys.path entry: the .pth files inside it are not processed, so nothing there imports the project.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def top_level_entries(dist: str) -> set[str]:
    """The site-packages entries (packages, modules, dist-info) an installed distribution owns."""
    files = importlib.metadata.distribution(dist).files or []
    return {f.parts[0] for f in files if not f.as_posix().startswith("..")}


def stack_without(dists: list[str], out: Path) -> Path:
    """`out`: a link per entry of this environment's site-packages, leaving out `dists`' entries and
    every .pth file (the project's editable finder among them)."""
    site = Path(sysconfig.get_paths()["purelib"])
    hidden = set().union(*(top_level_entries(d) for d in dists))
    out.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name in hidden or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
            continue
        (out / entry.name).symlink_to(entry)
    return out


def fresh_venv(root: Path, stack: Path) -> Path:
    """A venv at `root` (no pip of its own: the stack's runs there) whose .pth adds `stack`; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "stack.pth").write_text(f"{stack}\n")
    return python


def clean_env(**extra) -> dict:
    """This environment without PYTHONPATH (the worktree must not leak in), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", **extra}


def run(python: Path, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(python), *args], cwd=cwd, env=clean_env(), capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(args)[:200]} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r
