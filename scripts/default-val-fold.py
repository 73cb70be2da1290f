"""Rebuild the shipped default model's own validation split (the training images it never saw) as a folder of
symlinks, OUT/{non,covid}/: the same files, case groups, validation fraction and seed as its training
(scripts/train-default-model.sh; fraction and seed from its model.json).

    .venv/bin/python scripts/default-val-fold.py DATA/covid-xray-5k OUT
"""

import csv
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr.checkpoint import default_model_path
from cxr.data import apply_groups, class_counts, labelled_files, split_train_val

data, out = sys.argv[1:]
training = json.load(open(os.path.join(default_model_path(), "model.json")))["provenance"]["training"]
rows = csv.DictReader(
    open(os.path.join(data, "SOURCE", "covid_images_ieee8023_metadata.tsv"), newline=""), delimiter="\t"
)
files = apply_groups(labelled_files(data, "train"), {r["filename"]: r["url"] or r["filename"] for r in rows})
_, val = split_train_val(files, training["val_fraction"], training["seed"])
for f in val:
    d = os.path.join(out, ("non", "covid")[f.label])
    os.makedirs(d, exist_ok=True)
    os.symlink(os.path.abspath(f.path), os.path.join(d, os.path.basename(f.path)))
print(f"validation split of the default model: {class_counts(val)} -> {out}", file=sys.stderr)
