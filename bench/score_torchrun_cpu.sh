#!/usr/bin/env bash
# `gainrl score` on 128 GSM8K questions with the embedded model: one process vs torchrun with 2 gloo ranks, one
# thread each, and a check that the outputs are identical. Figures: bench/results/score_torchrun_cpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
DATA=${DATA:-../shared/data/gsm8k_train.parquet}
WORK=${WORK:-$(mktemp -d)}
PY=${PY:-.venv/bin/python}
/usr/bin/time -f "one process: %e s" "$PY" -m gainrl score --data "$DATA" --limit 128 --out "$WORK/s1" --no-progress
/usr/bin/time -f "torchrun 2 ranks: %e s" "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m gainrl score --data "$DATA" --limit 128 --out "$WORK/s2" --no-progress
cmp "$WORK/s1/scores.jsonl" "$WORK/s2/scores.jsonl" && echo "scores.jsonl identical"
"$PY" -c "import sys, torch; a, b = (torch.load(f'{sys.argv[1]}/{d}/order.pt') for d in ('s1', 's2')); print('order.pt equal:', torch.equal(a, b))" "$WORK"
for d in s1 s2; do "$PY" -c "import json, sys; print(sys.argv[1], json.load(open(sys.argv[1] + '/summary.json'))['timing'])" "$WORK/$d"; done
