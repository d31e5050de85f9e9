#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (made to finish within 8 minutes on an H100):
#   1. installs what is missing: from pip's index, or, offline, from wheels in
#      $GPU_CHECK_WHEELS (default .whl/, see docs/deployment.md);
#   2. runs tests/gpu (fp16/bf16 greedy equal to Hugging Face on the tiny and small models,
#      per-rank loading on CUDA, the Ray actor path at tp=1 with Ray's GPU
#      isolation, bitsandbytes 8-bit/4-bit), JUnit XML to $OUT_DIR/gpu_tests.xml;
#   3. measures decode tokens/s of the small model at batch 1 and 32
#      (benchmarks/gpu_decode.py, $OUT_DIR/gpu_decode.json);
#   4. writes the summary $OUT_DIR/gpu_check.json (device, versions, every test's outcome,
#      the figures) and prints it.
# Exit status: 0 all tests passed, 1 a test failed, 3 no CUDA device (nothing run).
# One GPU cannot run tensor parallelism over NCCL (tp=2 needs two): tp>1 is covered by the
# CPU tests (tests/unit/engine/rank/test_slice_loading.py, tests/unit/engine/test_engine.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-out}
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)

if ! $PY -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY has no torch; run it with PYTHON=a python that has torch's CUDA build"
  echo '{"cuda": false, "error": "no torch"}' > "$OUT_DIR/gpu_check.json"
  exit 3
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing run"
  echo '{"cuda": false}' > "$OUT_DIR/gpu_check.json"
  exit 3
fi

# -- 1. what is missing -------------------------------------------------------------------
missing=$($PY scripts/gpu_check_env.py missing 2>/dev/null)
if [ -n "$missing" ] && [ -d "$WHEELS" ]; then
  echo "gpu_check: installing from $WHEELS: $missing"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/m-ai-site "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/m-ai-site"
  for sdist in "$WHEELS"/*.tar.gz; do   # DeepSpeed ships as a source archive
    [ -e "$sdist" ] && DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation \
      --target /tmp/m-ai-site "$sdist"
  done
  missing=$($PY scripts/gpu_check_env.py missing 2>/dev/null)
fi
if [ -n "$missing" ]; then
  echo "gpu_check: installing from the package index: $missing"
  $PY -m pip install -q -c docker/constraints.txt $($PY scripts/gpu_check_env.py requirements $missing) \
    || echo "gpu_check: could not install $missing (no index reachable?); the tests needing them skip"
  missing=$($PY scripts/gpu_check_env.py missing 2>/dev/null)
fi
$PY scripts/gpu_check_env.py versions > "$OUT_DIR/gpu_env.json"

# -- 2. tests/gpu -------------------------------------------------------------------------
timeout 300 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider --timeout=240 \
  --junitxml="$OUT_DIR/gpu_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# -- 3. decode throughput -----------------------------------------------------------------
timeout 120 $PY benchmarks/gpu_decode.py --out "$OUT_DIR/gpu_decode.json" --repeats 3 \
  2>&1 | tail -n 20

# -- 4. summary ---------------------------------------------------------------------------
$PY scripts/gpu_check_env.py summary "$OUT_DIR" "$tests_rc" "$(( $(date +%s) - started ))" "$missing"
[ "$tests_rc" -eq 0 ] && exit 0 || exit 1
