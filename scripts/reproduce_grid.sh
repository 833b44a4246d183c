#!/usr/bin/env bash
# The committed `fastguide reproduce` grid on 2 CPU cores, resumable: rerun it after an interruption and
# it skips the runs each results.csv holds (--resume).
#
#   bash scripts/reproduce_grid.sh OUT          # all of it: ~25 min DDIM-25, then ~4 h DDPM-250
#   bash scripts/reproduce_grid.sh OUT merge    # only the last part: one results.csv, results.md, plots
#
# Each model runs in its own folder on one core, the two side by side. DDPM-250 runs one policy at a
# time, the most important first, so that an interrupted grid holds whole policies.
set -euo pipefail
out=${1:?usage: scripts/reproduce_grid.sh OUT [merge]}
only=${2:-all}
models=(uncond cond)

run() { OMP_NUM_THREADS=1 fastguide reproduce --num_samples 150 --quiet --resume "$@"; }

if [[ $only == all ]]; then
  for m in "${models[@]}"; do mkdir -p "$out/ddim25/$m" "$out/ddpm250/$m"; done
  for m in "${models[@]}"; do
    run --out "$out/ddim25/$m" --models "$m" --samplers ddim >>"$out/ddim25/log_$m.txt" 2>&1 &
  done
  wait
  for pol in eds constant timestep-aware constant-range gradient-norm; do
    for m in "${models[@]}"; do
      run --out "$out/ddpm250/$m" --models "$m" --samplers ddpm --policies "none,$pol" \
        >>"$out/ddpm250/log_$m.txt" 2>&1 &
    done
    wait
  done
fi

# one CSV of every run (the header once), then the table and plots from it
python3 - "$out" <<'EOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = [out / half / m / "results.csv" for half in ("ddim25", "ddpm250") for m in ("uncond", "cond")]
rows, fields = [], None
for part in parts:
    if part.is_file():
        with open(part, newline="") as f:
            reader = csv.DictReader(f)
            fields = fields or reader.fieldnames
            rows += list(reader)
with open(out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
print(f"{len(rows)} runs in {out / 'results.csv'}")
EOF
cd "$out" && fastguide reproduce --out . --num_samples 150 --report --quiet
