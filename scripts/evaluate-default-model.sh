#!/usr/bin/env bash
# The figures in the default model's card: the model at its shipped threshold on the external sets of
# ../shared/data/external (other hospitals than its training data), one report each under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
EXT=${EXT:-../shared/data/external}
OUT=${OUT:-runs/default-eval}
MODEL=${MODEL:-default}
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
run() {
  name=$1; shift
  mkdir -p "$OUT/$name"
  .venv/bin/python jobs/evaluate.py --model "$MODEL" --output "$OUT/$name" --split all "$@" > "$OUT/$name/summary.txt"
  head -1 "$OUT/$name/summary.txt"
}
run hannover-covid   --data "$EXT/hannover-covid/covid"
run actualmed        --data "$EXT/actualmed"
run figure1          --data "$EXT/figure1"
run kermany-pediatric-non --data "$EXT/kermany-pediatric"
