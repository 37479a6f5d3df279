#!/usr/bin/env bash
# Nsight Compute counters of one fused forward and one forward+backward (benchmarks/profile_cuda.py
# --ncu) per head dim, summarised by benchmarks/ncu_summary.py. Expects the extension built in
# place and PYTHONPATH=python. Usage: bash benchmarks/ncu_run.sh OUTDIR [LENGTHS] [HEAD_DIMS]
#   NCU_ARGS   extra ncu arguments, e.g. "--launch-count 18": at 64k on Hopper, the forward, then
#              the forward+backward's forward and its first backward head group (a whole 64k
#              backward takes minutes under ncu)
set -uo pipefail
out="$1"; lengths="${2:-64k}"; dims="${3:-64 128}"
stalls=""
for r in long_scoreboard short_scoreboard barrier mio_throttle math_pipe_throttle wait \
         lg_throttle not_selected dispatch_stall membar; do
  stalls+="smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio,"
done
metrics="${stalls}sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,dram__bytes_write.sum"
for d in $dims; do
  ncu --profile-from-start off ${NCU_ARGS:-} --section SpeedOfLight --section Occupancy --section LaunchStats \
      --metrics "$metrics" --csv --page details \
      python3 benchmarks/profile_cuda.py --ncu --lengths "$lengths" --head-dim "$d" \
      > "$out/ncu_d$d.csv" 2> "$out/ncu_d$d.err"
  echo "== ncu, n=$lengths d=$d (first block: forward; second: forward+backward)"
  python3 benchmarks/ncu_summary.py "$out/ncu_d$d.csv" || tail -5 "$out/ncu_d$d.err"
done
