#!/usr/bin/env bash
# Leave-one-source-out runs of the shipped model's recipe on the same-source pack (model card, "Inside sources"):
#   b  trained on the pack alone                         runs/loso/pack
#   c  the same, balanced by source                      runs/loso/pack-balanced
#   d  COVID-Xray-5k + the pack minus the held-out source runs/loso/cxr5k-pack (balanced by site: -balanced)
# Recipe: scripts/train-default-model.sh's (mobilenet_v2 from ImageNet, 6 epochs, lr 3e-4, 128 px, lung crop,
# target sensitivity 0.98) with one threshold split (no --threshold-folds) and --oversample 1 (the class
# weight balances the classes). Each run also trains its recipe on everything (the candidate model).
# Usage: bash scripts/holdout-sources.sh [b] [c] [d] [d-balanced]   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/loso}
RECIPE=(--backbone mobilenet_v2 --weights imagenet --epochs 6 --lr 3e-4 --batch-size 32 --image-size 128 --crop lung
  --target-sensitivity 0.98 --holdout-by source)
mkdir -p "$OUT"
for run in "${@:-b c d d-balanced}"; do
  for r in $run; do
    case $r in
      b) .venv/bin/python jobs/train.py --data "$DATA/sources/manifest.csv" --oversample 1 "${RECIPE[@]}" --output "$OUT/pack" ;;
      c) .venv/bin/python jobs/train.py --data "$DATA/sources/manifest.csv" --oversample 1 --balance-by source "${RECIPE[@]}" \
           --output "$OUT/pack-balanced" ;;
      d|d-balanced)
        .venv/bin/python scripts/cxr5k-plus-sources.py "$DATA/covid-xray-5k" "$DATA/sources/manifest.csv" "$OUT/cxr5k-pack.csv"
        extra=(); [ "$r" = d-balanced ] && extra=(--balance-by site)
        .venv/bin/python jobs/train.py --data "$OUT/cxr5k-pack.csv" --oversample 1 "${extra[@]}" "${RECIPE[@]}" \
          --output "$OUT/cxr5k-pack${extra:+-balanced}" ;;
    esac
  done
done
