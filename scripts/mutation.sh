#!/usr/bin/env bash
# Mutation testing of the pure core modules with mutmut (config: [tool.mutmut] in pyproject.toml:
# lmsys/calibration.py, tta.py, ensemble.py, metrics.py, data/validate.py, data/folds.py, distill.py,
# exercised by their fast unit tests). Not part of CI: ~1.5 h for all 2889 mutants on a loaded 2-core
# machine (one child, nice 10). Results: benchmarks/MUTATION.md.
#
#   scripts/mutation.sh                         every mutant
#   scripts/mutation.sh 'lmsys.tta*'            one module's mutants (mutmut's name globs)
#   MUTATION_DIR=/tmp/m JOBS=2 scripts/mutation.sh
#   scripts/mutation.sh $(cat survivors.txt)    re-test named mutants (e.g. the survivors, after adding tests)
#   scripts/mutation.sh --recheck names.txt     re-test named mutants of an existing $MUTATION_DIR/mutants
#                                               against the tests as they are now, one process, no stats
#                                               pass: each mutant switched on (MUTANT_UNDER_TEST, mutmut's
#                                               own switch) while its module's whole test file runs (-x);
#                                               prints "<name> killed|survived", mutmut's records untouched
#
# It runs in a copy of the working tree (tracked + untracked, not ignored) under $MUTATION_DIR, so
# the repo gets no mutants/ directory and edits made meanwhile do not reach a running session; a
# second call with the same MUTATION_DIR reuses mutmut's results for unchanged code. Ends with the
# summary (killed / survived / ...) and the surviving mutants' names; `mutmut show NAME` in
# $MUTATION_DIR prints one's diff. Needs mutmut (requirements-dev.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${MUTATION_DIR:-/tmp/lmsys-mutation}
JOBS=${JOBS:-1}
. .venv/bin/activate
command -v mutmut >/dev/null || { echo "error: mutmut is not installed: pip install -r requirements-dev.txt -c constraints.txt" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CI=${CI:-}
mkdir -p "$WORK"
git ls-files -co --exclude-standard -z | xargs -0 cp -p --parents -t "$WORK/" 2>/dev/null || true   # deleted files: skip
cd "$WORK"
# mutmut copies tests/ into mutants/ once and never refreshes it: tests edited since would not run
if [ -d mutants ]; then rm -rf mutants/tests && cp -a tests mutants/tests; fi
if [ "${1:-}" = --recheck ]; then
  names=$(realpath "$2")
  cd mutants
  exec nice -n "${NICE:-10}" python - "$names" <<'EOF'
import contextlib, io, os, sys
sys.path.insert(0, os.getcwd())
import pytest
FILES = {"lmsys.calibration": "tests/test_calibration.py", "lmsys.tta": "tests/test_metrics_tta.py",
         "lmsys.metrics": "tests/test_metrics_tta.py", "lmsys.ensemble": "tests/test_ensemble.py",
         "lmsys.distill": "tests/test_distill.py", "lmsys.data.validate": "tests/test_validate.py",
         "lmsys.data.folds": "tests/test_transforms_folds.py"}
for name in dict.fromkeys(l.strip() for l in open(sys.argv[1]) if l.strip()):
    os.environ["MUTANT_UNDER_TEST"] = name
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:random_order", "-W", "ignore",
                          "-k", "not cli and not demo_data_passes and not shared",
                          FILES[name.split(".x_")[0].split(".xǁ")[0]]])
    print(name, "survived" if rc == 0 else "killed" if rc == 1 else f"error (pytest exit {int(rc)})", flush=True)
EOF
fi
nice -n "${NICE:-10}" mutmut run --max-children "$JOBS" "$@" || true     # exits non-zero when mutants survive
mutmut results --all true > mutation-results.txt
python - "$@" <<'EOF'
"""Summary of mutation-results.txt (lines '    <mutant name>: <status>'), optionally limited to globs."""
import collections, fnmatch, sys
globs = sys.argv[1:] or ["*"]
rows = [l.strip().rsplit(": ", 1) for l in open("mutation-results.txt") if ": " in l]
rows = [(n, s) for n, s in rows if any(fnmatch.fnmatch(n, g) for g in globs)]
by_mod = collections.defaultdict(collections.Counter)
for n, s in rows:
    by_mod[n.split(".x_")[0].split(".xǁ")[0]][s] += 1
total = collections.Counter(s for _, s in rows)
for mod, c in sorted(by_mod.items()):
    print(f"{mod:32s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
killed = total["killed"] + total["timeout"]
judged = killed + total["survived"]
print(f"TOTAL {dict(total)}; killed (incl. timeout) {killed}/{judged} = {100 * killed / max(judged, 1):.1f}%")
print("survivors:")
for n, s in rows:
    if s == "survived":
        print(f"  {n}")
EOF
