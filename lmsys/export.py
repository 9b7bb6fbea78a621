"""`lmsys export --out DIR`: the final model as one bundle that predicts offline, with no pipeline root.

    DIR/
      lmsys-bundle.json   the manifest: every file's sha256 and size, the exact package versions (the
                          serving stack's, compared at predict, and every installed one), the recipe and
                          profile (its resolved parameters), the pipeline's own metrics, the git
                          revision, and each wheel with where it came from (or why it is missing)
      settings.json       what predict needs besides the model: text (template, word and token
                          budgets), predict (tta, batch_size, devices), serve (cards, dtype, nonfinite),
                          quantize.backend, the class prior (for unreadable test rows) and the
                          calibration settings (provenance only: step 4.5 scaled the teachers' logits
                          before distillation; the student's predictions get no calibration)
      model/              the final model dir: quantized if step 7 ran, else the merged one (weights,
                          config, tokenizer, serving.json, ensemble.json, quantize.json)
      wheels/             what a stock Kaggle image lacks (BUNDLE_DISTS): this project, and for a GPTQ
                          model gptqmodel, optimum and gptqmodel's own requirements (PyPcre is a C
                          extension: its wheel is the one pip built here, for this Python and platform)
      README.md           the notebook cells

Wheels come from what this machine has, offline (find_wheel): pip's wheel cache, pip's find-links
directories and file:// indexes (/opt/wheels, /opt/pypi*), each the installed version with a tag this
interpreter accepts; else the installed files are repacked into a wheel from their RECORD
(repack_installed); else the dist is listed under missing_wheels with the reason, and the export warns.
The project's own wheel is built from its tracked sources, its version tagged with the git revision.

`lmsys predict --model DIR --test CSV --out CSV` (predict_bundle) reads DIR alone: it checks the files
against the manifest (sizes; sha256 of all but the weights), notes packages whose version differs, and
predicts exactly as the pipeline's step 8 (lmsys.steps.serve.answer_file).
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from lmsys.io import atomic_dir, file_sha256, write_json

MANIFEST, SETTINGS, MODEL, WHEELS = "lmsys-bundle.json", "settings.json", "model", "wheels"
FORMAT = "lmsys-bundle/1"
PROJECT = "lmsys-pipeline"
PROJECT_SOURCES = ("pyproject.toml", "lmsys", "tasks", "flows", "stages")
# Not in a stock Kaggle image, and needed to load a GPTQ model through transformers: gptqmodel and
# optimum, and gptqmodel's own requirements that are not common ML packages. The rest of the stack
# (torch, transformers, tokenizers, safetensors, peft, accelerate, pandas, pyarrow, pyyaml, ...) is
# assumed present; `--wheel NAME` adds any other installed distribution (e.g. a newer transformers).
BUNDLE_DISTS = ("gptqmodel", "optimum", "pypcre", "logbar", "tokenicer", "device-smi", "defuser")
# The versions the manifest records and predict compares (a difference is a note, not an error).
PREDICT_STACK = ("torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "peft", "accelerate",
                 "numpy", "pandas", "pyarrow", "pyyaml", "scikit-learn", "matplotlib", *BUNDLE_DISTS)
HASHED_MAX_BYTES = 64 << 20     # predict re-hashes files up to this size; larger ones (weights) by size only
NOT_COPIED = (".partial", ".tmp")


# ---------------------------------------------------------------- export

def export_bundle(cfg: dict, out: Path, model_dir: Path | None = None, extra_dists: tuple[str, ...] = (),
                  wheels: bool = True) -> dict:
    """Write the bundle of `cfg`'s pipeline run (its last run's final model, or `model_dir`) to `out`,
    atomically; returns the manifest. Raises FileNotFoundError without a model or its serving.json."""
    from lmsys import target
    from lmsys.paths import Layout
    from lmsys.revision import git_rev
    from lmsys.steps.serve import final_model_dir, model_class_prior
    layout = Layout.of(cfg)
    if model_dir is None:
        model_dir = (Path(json.loads(layout.last_run.read_text())["model"]) if layout.last_run.exists()
                     else final_model_dir(cfg, layout))
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no model (config.json missing): run the pipeline (`lmsys run`) or pass --model")
    serving = target.read_record(model_dir)
    quantized = (model_dir / "quantize.json").exists()
    prior = model_class_prior(model_dir)
    if prior is None:
        raise FileNotFoundError(f"{model_dir}: no class prior recorded (ensemble.json): rerun step 6")
    dists = [*(BUNDLE_DISTS if quantized else ()), *extra_dists]
    with atomic_dir(out) as tmp:
        shutil.copytree(model_dir, tmp / MODEL, ignore=shutil.ignore_patterns("*.partial", "*.tmp", ".*"))
        write_json(bundle_settings(cfg, prior), tmp / SETTINGS)
        found, missing = collect_wheels(dists, tmp / WHEELS, git_rev()) if wheels else ([], [])
        packages = installed_versions()
        packages[PROJECT] = next((w["version"] for w in found if w["dist"] == PROJECT), packages[PROJECT])
        (tmp / "README.md").write_text(bundle_readme(out.name, quantized))
        manifest = {"format": FORMAT, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "git_revision": git_rev(), "profile": cfg["profile"], "recipe": _recipe(),
                    "params": {k: v for k, v in cfg.items() if k != "root"},
                    "model": {"source": str(model_dir), "quantized": quantized, "serving": serving,
                              "quantize": _json_or_none(model_dir / "quantize.json"),
                              "ensemble": _json_or_none(model_dir / "ensemble.json")},
                    "metrics": _json_or_none(layout.reports / "metrics.json"),
                    "python": sys.version.split()[0], "interpreter_tag": _interpreter_tag(),
                    "packages": packages, "environment": _environment(), "wheels": found,
                    "missing_wheels": missing,
                    "files": file_table(tmp)}
        write_json(manifest, tmp / MANIFEST)
    return manifest


def bundle_settings(cfg: dict, prior) -> dict:
    """settings.json: the parameters predict reads (lmsys.steps.serve.predict_rows), the class prior and
    the calibration settings (provenance)."""
    return {"text": dict(cfg["text"]), "predict": dict(cfg["predict"]), "serve": dict(cfg["serve"]),
            "quantize": {"backend": cfg["quantize"]["backend"]}, "class_prior": [float(x) for x in prior],
            "calibration": {**dict(cfg["calibrate"]), "applied_at_predict": False,
                            "note": "step 4.5 scaled the teachers' logits before distillation; the student's "
                                    "predictions are used as they are"}}


def _recipe() -> list[dict]:
    from lmsys.steps.recipe import numbered
    return [{"number": n, "step": s.name} for n, s in numbered()]


def _json_or_none(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _interpreter_tag() -> str:
    from packaging import tags
    return str(next(iter(tags.sys_tags())))


def installed_versions(names=PREDICT_STACK) -> dict[str, str | None]:
    out = {}
    for n in (*names, PROJECT):
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def _environment() -> dict[str, str]:
    """Every distribution installed where the bundle was made, name -> version (the exact stack)."""
    return dict(sorted({d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                        if d.metadata["Name"]}.items()))


def file_table(root: Path) -> dict[str, dict]:
    """relative path -> {sha256, bytes} of every file under root (the manifest's own entry excluded)."""
    return {p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


# ---------------------------------------------------------------- wheels

def collect_wheels(dists: list[str], out: Path, revision: str) -> tuple[list[dict], list[dict]]:
    """(wheels written to `out`, missing dists with the reason): the project's own wheel, then each of
    `dists` at its installed version (find_wheel, else repack_installed)."""
    out.mkdir(parents=True, exist_ok=True)
    found, missing = [project_wheel(out, revision)], []
    for name in dict.fromkeys(dists):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append({"dist": name, "version": None, "reason": "not installed here, so its version is unknown"})
            continue
        hit = find_wheel(name, version)
        if hit is not None:
            shutil.copy2(hit, out / hit.name)
            found.append({"file": hit.name, "dist": name, "version": version, "source": str(hit)})
            continue
        try:
            path = repack_installed(name, out)
        except ValueError as e:
            missing.append({"dist": name, "version": version, "reason": f"{e}; no wheel of it in pip's cache, "
                            f"find-links or file:// indexes either: fetch it where an index is reachable "
                            f"(pip download --no-deps {name}=={version}) into {WHEELS}/"})
            continue
        found.append({"file": path.name, "dist": name, "version": version,
                      "source": "repacked from the installed files (their RECORD)"})
    return found, missing


def project_wheel(out: Path, revision: str) -> dict:
    """Build this project's wheel from its tracked sources into `out`, versioned <version>+g<revision>."""
    from lmsys.config import ROOT
    with tempfile.TemporaryDirectory(prefix="lmsys-wheel-") as tmp:
        src = Path(tmp) / "src"
        for rel in _project_files(ROOT):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
        pyproject = src / "pyproject.toml"
        text = pyproject.read_text()
        version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
        local = "g" + revision.replace("+dirty", "").strip()[:12] + (".dirty" if revision.endswith("+dirty") else "")
        full = f"{version}+{local}" if revision != "unknown" else version
        pyproject.write_text(text.replace(f'version = "{version}"', f'version = "{full}"', 1))
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(out), str(src)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building the {PROJECT} wheel failed: {r.stderr.strip()[-1000:]}")
    wheel = next(out.glob(f"{PROJECT.replace('-', '_')}-*.whl"))
    return {"file": wheel.name, "dist": PROJECT, "version": full, "source": f"built from {ROOT} at {revision}"}


def _project_files(root: Path) -> list[str]:
    """The project's sources: git's tracked files of PROJECT_SOURCES, else every non-cache file there."""
    r = subprocess.run(["git", "ls-files", "--", *PROJECT_SOURCES], cwd=root, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return [f for f in r.stdout.splitlines() if (root / f).is_file()]
    return [p.relative_to(root).as_posix() for s in PROJECT_SOURCES for p in sorted((root / s).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts] if (root / "pyproject.toml").exists() else []


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_sources() -> list[Path]:
    """Where pip keeps wheels on this machine: its wheel cache, its find-links directories and the
    file:// indexes it is configured with (their files)."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    values = re.findall(r"(?:find-links|index-url|extra-index-url)='([^']*)'", r.stdout)
    dirs = []
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True).stdout.strip()
    if cache:
        dirs.append(Path(cache) / "wheels")
    for value in values:
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if item.startswith("file://") and path.name == "simple":
                dirs.append(path.parent)            # a simple index: its links point into a sibling dir
            elif not item.startswith(("http://", "https://")):
                dirs.append(path)
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def find_wheel(name: str, version: str, sources: list[Path] | None = None) -> Path | None:
    """A wheel of `name` at exactly `version` with a tag this interpreter accepts, from wheel_sources()."""
    from packaging import tags
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    accepted = set(tags.sys_tags())
    for d in sources if sources is not None else wheel_sources():
        for f in sorted(d.rglob("*.whl")):
            try:
                wname, wversion, _, wtags = parse_wheel_filename(f.name)
            except InvalidWheelFilename:
                continue
            if _canonical(wname) == _canonical(name) and str(wversion) == version and wtags & accepted:
                return f
    return None


def repack_installed(name: str, out: Path) -> Path:
    """A wheel of the installed distribution `name`, rebuilt from the files its RECORD lists (what its
    own wheel installed, minus scripts and data outside site-packages, which installs regenerate or do
    not need). Raises ValueError for an editable install or one without RECORD/WHEEL."""
    dist = importlib.metadata.distribution(name)
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        raise ValueError(f"{name} is an editable install")
    wheel_meta, files = dist.read_text("WHEEL"), dist.files
    if not wheel_meta or not files:
        raise ValueError(f"{name} was not installed from a wheel (no WHEEL or RECORD in its metadata)")
    tag_list = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    parts = [sorted({t.split("-")[i] for t in tag_list}) for i in range(3)]
    meta_name = dist.metadata["Name"]
    fname = f"{re.sub(r'[-_.]+', '_', meta_name)}-{dist.version}-{'-'.join('.'.join(p) for p in parts)}.whl"
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    record, dist_info = [], None
    with zipfile.ZipFile(out / fname, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            rel = f.as_posix()
            if rel.startswith("..") or "__pycache__" in f.parts or rel.endswith(".pyc"):
                continue
            if f.parts[0].endswith(".dist-info"):
                dist_info = f.parts[0]
                if f.name in skip:
                    continue
            data = Path(dist.locate_file(f)).read_bytes()
            z.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{rel},sha256={digest},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return out / fname


# ---------------------------------------------------------------- predict from a bundle

def is_bundle(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def verify(bundle: Path) -> tuple[dict, list[str]]:
    """(manifest, notes): raises ValueError naming the first file that is missing or differs from the
    manifest (sizes always, sha256 up to HASHED_MAX_BYTES); notes name packages whose installed version
    differs from the exporting machine's."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{bundle / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, want in manifest["files"].items():
        p = bundle / rel
        if not p.is_file():
            raise ValueError(f"{p}: missing from the bundle (the manifest lists it); copy the whole bundle")
        if p.stat().st_size != want["bytes"] or (want["bytes"] <= HASHED_MAX_BYTES and file_sha256(p) != want["sha256"]):
            raise ValueError(f"{p}: differs from the manifest (size or sha256): the bundle was changed; export it again")
    here = installed_versions()
    notes = [f"{name} {here.get(name) or 'not installed'} here, {v} where the bundle was made"
             for name, v in manifest["packages"].items() if name in here and v and here.get(name) != v]
    return manifest, notes


def predict_bundle(bundle: Path, test_csv: Path, out_csv: Path, overrides: dict | None = None, tta: bool = True):
    """`lmsys predict --model BUNDLE --test CSV --out CSV`: verify the bundle, then answer the test file
    with its model and settings (`overrides`: dotted keys of settings.json, e.g. predict.devices=2).
    Returns (submission, fallback rows, notes)."""
    from lmsys.config import set_in
    from lmsys.steps.serve import answer_file
    bundle = Path(bundle)
    _, notes = verify(bundle)
    settings = json.loads((bundle / SETTINGS).read_text())
    for k, v in (overrides or {}).items():
        set_in(settings, k, v)
    tta = tta and settings["predict"]["tta"]
    sub, fallback = answer_file(Path(test_csv), Path(out_csv), bundle / MODEL, settings,
                                np.asarray(settings["class_prior"], dtype=np.float64), tta)
    return sub, fallback, notes


# ---------------------------------------------------------------- the notebook

def bundle_readme(name: str, quantized: bool) -> str:
    """README.md of a bundle: how to predict with it, on Kaggle and elsewhere."""
    return f"""# {name}: an lmsys-pipeline bundle

The final model{' (GPTQ 8-bit)' if quantized else ''}, its tokenizer and text settings, and the wheels a stock
Kaggle image lacks. `lmsys-bundle.json` lists every file's sha256, the package versions, the parameters,
the pipeline's metrics and the git revision it was made from.

## Kaggle (offline notebook)

Add this folder as a dataset (the notebook sees it under /kaggle/input/<dataset>), then:

```
!pip install --no-index --no-deps /kaggle/input/<dataset>/wheels/*.whl
!lmsys predict --model /kaggle/input/<dataset> --test /kaggle/input/lmsys-chatbot-arena/test.csv --out /kaggle/working/submission.csv
```

Both A/B orders run on the visible GPUs, one process each (2 x T4: the original order on one, the swapped
order on the other); `--set predict.devices=1` keeps it on one.

## Anywhere else

`pip install --no-index --no-deps wheels/*.whl` into an environment with the stack (torch, transformers,
...), then the same `lmsys predict --model <this folder> ...`.
"""
