"""Atomic writes: a killed step never leaves a half-written artifact where a later step
(or a cache hit) could pick it up. Files go to a temp name in the same directory, then
os.replace; directories are built in a sibling temp dir, then swapped in."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpace(OSError):
    """The disk (or quota) filled while writing `path`: the OS error names no file, this does."""

    def __init__(self, path: Path, e: OSError):
        super().__init__(e.errno, f"no space left on the device writing {path} ({e.strerror or e}): free space "
                                  "there, or use --root on a larger disk", str(path))

    def __str__(self) -> str:
        return self.strerror


@contextlib.contextmanager
def _naming_a_full_disk(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE and not isinstance(e, NoSpace):
            raise NoSpace(path, e) from e
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`. A full disk raises
    NoSpace naming `path`."""
    path = Path(path)
    with _naming_a_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; artifacts are ordinary files
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; on success it replaces `path` whole. A full disk
    raises NoSpace naming `path`."""
    path = Path(path)
    with _naming_a_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        try:
            with _naming_a_full_disk(path):
                yield tmp
        except NoSpace as e:                   # a file of the staged set: named where it would have been published
            raise NoSpace(Path(str(e.filename).replace(str(tmp), str(path))), e.__cause__ or e) from e.__cause__
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    return Path(path)


TABLE_FORMATS = ("csv.gz", "csv", "parquet")     # a table's format is its suffix, any case (longest first)


def table_format(path: str | Path) -> str:
    """"csv", "csv.gz" or "parquet" from the suffix of `path`, case-insensitive (x.PARQUET, x.Csv.Gz).
    Raises ValueError naming the path for any other suffix: a table is never written in a format
    its name does not say (the project's readers go by the name)."""
    name = Path(path).name.lower()
    for fmt in TABLE_FORMATS:
        if name.endswith("." + fmt):
            return fmt
    raise ValueError(f"{path}: a table is written as .csv, .csv.gz or .parquet (the suffix picks the format), "
                     f"not {''.join(Path(path).suffixes) or 'a name without a suffix'}")


def check_output_table(path: str | Path) -> Path:
    """For a command's --out, before any work: a table name (table_format) that is not a directory.
    Raises ValueError naming the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; --out names the file to write (e.g. {path / 'submission.csv'})")
    table_format(path)
    return path


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write csv, gzipped csv or parquet by suffix (table_format), atomically."""
    path = Path(path)
    fmt = table_format(path)
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False, compression="gzip" if fmt == "csv.gz" else None)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tree_sha256(path: str | Path) -> str:
    """Content hash of a file or of every file under a directory (names and bytes)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- content hashes kept beside outputs

def manifest_path(path: str | Path) -> Path:
    """Where the content manifest of `path` (a step's output file or directory) lives: beside it,
    `.<name>.manifest.json` (a dot name: tree_sha256 of an enclosing directory leaves it out)."""
    path = Path(path)
    return path.with_name(f".{path.name}.manifest.json")


def _listing(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"": path}
    return {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def write_manifest(path: str | Path) -> dict:
    """Hash `path` once and record, beside it, its tree_sha256 with every file's size and mtime, so a
    later content_hash of an unchanged output reads the record instead of every byte (a merged 9B model
    is ~18 GB). Called by whoever has just written `path` (tasks/steps.py after a step)."""
    path = Path(path)
    files = {rel: [p.stat().st_size, p.stat().st_mtime_ns, file_sha256(p)] for rel, p in _listing(path).items()}
    record = {"tree": _tree_hash(files), "files": files}
    write_json(record, manifest_path(path))
    return record


def _tree_hash(files: dict[str, list]) -> str:
    """tree_sha256 from the files' own hashes (the same value)."""
    if list(files) == [""]:
        return files[""][2]
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode())
        h.update(files[rel][2].encode())
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """tree_sha256(path), read from its manifest when the manifest names exactly the files there now with
    their sizes and mtimes (cheap: a stat per file); hashed in full otherwise."""
    path = Path(path)
    try:
        record = json.loads(manifest_path(path).read_text())
        now = _listing(path)
        if set(now) == set(record["files"]) and all(
                [p.stat().st_size, p.stat().st_mtime_ns] == record["files"][rel][:2] for rel, p in now.items()):
            return record["tree"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return tree_sha256(path)
