#!/usr/bin/env bash
# Set up (if needed), then score the bundled sample chest X-rays with the shipped default model and
# show the result table. Output: out/demo/ (Parquet). Starts a local Ray instance unless RAY_ADDRESS is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/python jobs/score.py --input lib/cxr/assets/samples --output out/demo --model default --overwrite "$@"
.venv/bin/python - <<'PY'
import pyarrow.dataset as ds
t = ds.dataset("out/demo", format="parquet").to_table().sort_by("path").to_pandas()
t["path"] = t["path"].str.replace(r".*/samples/", "", regex=True)
t["error"] = t["error"].fillna("")
print(t[["path", "prob_covid", "prediction", "threshold", "width", "height", "error"]].to_string(index=False))
PY
