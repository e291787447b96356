#!/usr/bin/env bash
# A cpu-tiny training step on this machine with ONE other CPU-bound process busy, for torch's
# own thread count (all cores), one thread, and mrn's default (the cores not already busy, one left free).
# Usage: bash docs/scripts/threads_busy.sh   (prints the three figures; ~2 min on 2 cores)
set -euo pipefail
python -c "while True: pass" &
busy=$!
trap 'kill $busy' EXIT
sleep 65   # let the 1-minute load average see the busy process
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
echo "cores: $cores; load average: $(cut -d' ' -f1-3 /proc/loadavg); one busy process running"
for t in "$cores" 1; do
  echo "--- --threads $t"
  mrn bench model --preset cpu-tiny --parts train --repeats 5 --threads "$t" 2>/dev/null | grep -iE "train|thread"
done
echo "--- default (no --threads, OMP_NUM_THREADS unset)"
env -u OMP_NUM_THREADS python - <<'PY'
from mrn_engine.threads import default_threads
print("mrn's default threads now:", default_threads())
PY
env -u OMP_NUM_THREADS mrn bench model --preset cpu-tiny --parts train --repeats 5 2>/dev/null | grep -iE "train|thread"
