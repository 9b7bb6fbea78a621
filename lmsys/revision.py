"""The code's revision: the git commit a run runs (step 9's report names it; the flow records it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from lmsys.config import ROOT

# Tracked files that a pipeline run itself rewrites: they do not make the code's revision dirty.
RUN_OUTPUTS = ("reports", "dvc.lock")


def git_rev(root: Path | str | None = None) -> str:
    """HEAD's commit, with `+dirty` when tracked files other than RUN_OUTPUTS differ from it
    ('unknown' outside git)."""
    root = Path(root or ROOT)
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    rev = r.stdout.strip()
    if r.returncode or not rev:
        return "unknown"
    d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                        *(f":(exclude){p}" for p in RUN_OUTPUTS)], cwd=root, capture_output=True, text=True)
    return rev + ("+dirty" if d.stdout.strip() else "")
