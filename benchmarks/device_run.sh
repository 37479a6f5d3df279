#!/usr/bin/env bash
# One call on the GPU machine (the device tool): build, the test suite, the main job, the CUDA
# benchmark and a compute-sanitizer pass, in that order of priority. Logs and JSON go to $OUT.
#   BENCH_ARGS   extra arguments of benchmarks/bench_attention.py (default: the issue-3 case)
#   DECODE_ARGS  extra arguments of benchmarks/bench_decode.py (default: the issue-4 case)
#   BENCH_TIMEOUT, DECODE_TIMEOUT, TEST_TIMEOUT   seconds (0: skip that step)
set -uo pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$(date +%s)
# build_ext --inplace: the machine has no network, so no build isolation and no editable install.
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH="$PWD/python"
[ "${TEST_TIMEOUT:-300}" != 0 ] && timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -rfE -p no:cacheprovider tests \
  --ignore=tests/test_deploy.py --ignore=tests/test_libbsbr.py 2>&1 | tee "$OUT/pytest.log" | tail -12
timeout 120 python3 -m bsbr_ext --device cuda --no-bench > "$OUT/main.log" 2>&1; echo "main job rc=$?"
[ "${BENCH_TIMEOUT:-240}" != 0 ] && timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_attention.py \
  --device cuda --markdown --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -25
[ "${DECODE_TIMEOUT:-240}" != 0 ] && timeout "${DECODE_TIMEOUT:-240}" python3 benchmarks/bench_decode.py \
  --device cuda --markdown --json "$OUT/decode.json" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" | tail -16
timeout 90 compute-sanitizer --tool memcheck --print-limit 20 python3 cuda/sanitize_small.py \
  > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
echo "total: $(( $(date +%s) - start )) s"
