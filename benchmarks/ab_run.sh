#!/usr/bin/env bash
# One GPU-machine call that compares the working tree ("new") with a baseline source tree
# ("base", e.g. `git archive HEAD` extracted into .ab_base): builds both, runs the CUDA tests and a
# compute-sanitizer memcheck on new, then the bsbr benchmark alternately on base and new (builds
# alternated within the call, so both see the same card and host), then the torch profiler's
# kernel table of each. Logs go to $OUT.
#   usage: bash benchmarks/ab_run.sh BASE_DIR
#   AB_LENGTHS     lengths of the benchmark (default 4k,64k)
#   AB_ROUNDS      base/new rounds (default 2)
#   AB_PROFILE     head dims for the profiler at the longest length (default "64"; "" skips it)
#   AB_GREP        extended regex of the profiler rows to print (default: every kernel row)
#   BASE_DTYPES, BASE_HEAD_DIMS   what the base build instantiates (default bf16; 64,128)
#   TEST_TIMEOUT   seconds for tests/test_cuda.py (default 200; 0 skips tests and memcheck)
set -uo pipefail
base="$(cd "${1:?usage: bash benchmarks/ab_run.sh BASE_DIR}" && pwd)" || exit 1
export PYTHONUNBUFFERED=1
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$(date +%s)
since() { echo "$(( $(date +%s) - start )) s"; }
MAX_JOBS="${MAX_JOBS:-16}" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 ||
  { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
echo "build new: $(since)"
# The base builds while the tests run (fewer jobs: the tests need the CPU too).
( cd "$base" && BSBR_DTYPES="${BASE_DTYPES:-bf16}" BSBR_HEAD_DIMS="${BASE_HEAD_DIMS:-64,128}" MAX_JOBS=8 \
    python3 setup.py build_ext --inplace > "$OUT/build_base.log" 2>&1
  echo "build base rc=$? at $(since)" ) &
base_build=$!
if [ "${TEST_TIMEOUT:-200}" != 0 ]; then
  PYTHONPATH="$PWD/python" timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -rfE -p no:cacheprovider \
    tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
  grep -E "^FAILED|^ERROR|passed|failed" "$OUT/test_cuda.log" | tail -15
  echo "tests done: $(since)"
  PYTHONPATH="$PWD/python" timeout 90 compute-sanitizer --tool memcheck --print-limit 20 \
    python3 cuda/sanitize_small.py > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?: $(tail -1 "$OUT/memcheck.log")"
fi
wait "$base_build"
row='^\| cuda \| [a-z0-9]+ \| [0-9]+ \| [0-9]+k \| [a-z]+ \| [0-9.]+ \|'
for _ in $(seq "${AB_ROUNDS:-2}"); do
  for side in base new; do
    root="$PWD"; [ "$side" = base ] && root="$base"
    echo "== $side ($(since))"
    PYTHONPATH="$root/python" timeout 120 python3 benchmarks/bench_attention.py --device cuda --impls bsbr \
      --lengths "${AB_LENGTHS:-4k,64k}" --no-memory --markdown --no-copy-bw 2>&1 | grep -E "$row" | cut -c1-60
  done
done
longest="${AB_LENGTHS:-4k,64k}"; longest="${longest##*,}"
for dim in ${AB_PROFILE-64}; do
  for side in base new; do
    root="$PWD"; [ "$side" = base ] && root="$base"
    log="$OUT/profile_${side}_d$dim.txt"
    PYTHONPATH="$root/python" timeout 90 python3 benchmarks/profile_cuda.py --head-dim "$dim" \
      --lengths "$longest" --rows 24 > "$log" 2>&1
    echo "== profile $side d=$dim, $longest: $(grep -m1 '^== n=' "$log" | sed 's/.*: //')"
    grep -E "${AB_GREP:-^void |^bsbr_cuda::}" "$log" | cut -c1-60,150-240
  done
done
echo "total: $(since)"
