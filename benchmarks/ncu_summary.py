"""One line per kernel launch from Nsight Compute's CSV (`--csv --page details`, with the
sections and --metrics that benchmarks/ncu_run.sh asks for, which also calls this script):
duration, DRAM and SM throughput as % of peak, achieved occupancy, registers, tensor-pipe
activity, DRAM bytes, and the three largest warp-stall reasons.

    python benchmarks/ncu_summary.py OUTDIR/ncu_d64.csv
"""

import csv
import sys
from collections import defaultdict

STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")  # ncu --metrics names
EXTRA = {"tensor%": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
         "rd MB": "dram__bytes_read.sum", "wr MB": "dram__bytes_write.sum"}


def main(path: str) -> None:
    rows = [r for r in csv.DictReader(line for line in open(path) if line.startswith('"'))]
    launches: dict = defaultdict(dict)
    order = []
    for r in rows:
        key = (r["ID"], r["Kernel Name"])
        if key not in launches:
            order.append(key)
        launches[key][r["Metric Name"]] = (r["Metric Value"], r["Metric Unit"])
    print(f"{'id':>4} {'kernel':48} {'time':>10} {'DRAM%':>6} {'SM%':>6} {'occ%':>6} {'regs':>5} "
          + " ".join(f"{k:>7}" for k in EXTRA) + "  top stalls (cycles per issue)")
    for key in order:
        m = launches[key]
        def val(name, default="-"):
            return m.get(name, (default, ""))[0]
        dur, unit = m.get("Duration", ("-", ""))
        stalls = sorted(((float(v.replace(",", "")), n[len(STALL[0]):-len(STALL[1])])
                         for n, (v, _) in m.items() if n.startswith(STALL[0]) and n.endswith(STALL[1])),
                        reverse=True)[:3]
        extra = []
        for label, metric in EXTRA.items():
            v, u = m.get(metric, ("-", ""))
            if v != "-" and label.endswith("MB"):
                v = f"{float(v.replace(',', '')) * {'byte': 1e-6, 'Kbyte': 1e-3, 'Mbyte': 1, 'Gbyte': 1e3}.get(u, float('nan')):.0f}"
            extra.append(f"{v:>7}")
        name = key[1].split("(")[0].split("<")[0][-48:]
        print(f"{key[0]:>4} {name:48} {dur + ' ' + unit:>10} {val('DRAM Throughput'):>6} "
              f"{val('Compute (SM) Throughput'):>6} {val('Achieved Occupancy'):>6} "
              f"{val('Registers Per Thread'):>5} " + " ".join(extra) + "  "
              + ", ".join(f"{n} {v:.1f}" for v, n in stalls))


if __name__ == "__main__":
    main(sys.argv[1])
