"""Content hashes kept beside a step's outputs (lmsys.io.write_manifest / content_hash): an unchanged
output is not read again to build the next cache key; a changed one is hashed in full."""
from __future__ import annotations

import os

import lmsys.io
from lmsys.io import content_hash, manifest_path, tree_sha256, write_manifest


def _tree(root):
    out = root / "adapter"
    (out / "sub").mkdir(parents=True)
    (out / "weights.bin").write_bytes(b"w" * 1000)
    (out / "sub" / "config.json").write_text('{"r": 8}')
    return out


def test_an_unchanged_output_is_hashed_from_its_manifest(tmp_path, monkeypatch):
    out = _tree(tmp_path)
    record = write_manifest(out)
    assert manifest_path(out) == tmp_path / ".adapter.manifest.json" and record["tree"] == tree_sha256(out)
    reads = []
    monkeypatch.setattr(lmsys.io, "file_sha256", lambda p, *a: reads.append(p) or "x")
    assert content_hash(out) == record["tree"] and reads == []                       # no byte read
    (out / "weights.bin").write_bytes(b"v" * 1000)                                     # same size, new mtime
    os.utime(out / "weights.bin", ns=(1, 1))
    content_hash(out)
    assert len(reads) == 2                                                             # hashed in full again


def test_a_file_added_removed_or_resized_is_hashed_in_full(tmp_path):
    out = _tree(tmp_path)
    old = write_manifest(out)["tree"]
    (out / "extra.txt").write_text("new")
    assert content_hash(out) == tree_sha256(out) != old
    write_manifest(out)
    (out / "sub" / "config.json").write_text('{"r": 16, "alpha": 32}')
    assert content_hash(out) == tree_sha256(out)
    (out / "extra.txt").unlink()
    assert content_hash(out) == tree_sha256(out)
    f = tmp_path / "table.parquet"
    f.write_bytes(b"abc")
    assert write_manifest(f)["tree"] == tree_sha256(f) == content_hash(f)
    manifest_path(f).write_text("{not json")
    assert content_hash(f) == tree_sha256(f)                                          # a broken manifest: hashed
