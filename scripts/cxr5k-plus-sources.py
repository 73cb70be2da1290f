"""One labelled manifest of the COVID-Xray-5k training split plus the same-source pack (`sources/manifest.csv`), for
leave-one-source-out runs that train on both (model card, measurement (d)):

    .venv/bin/python scripts/cxr5k-plus-sources.py DATA/covid-xray-5k DATA/sources/manifest.csv OUT.csv

Columns: path (absolute), label, patient, source (the pack's four sources; empty for COVID-Xray-5k rows, so they
are never held out and always train), site (the pack's source, or `cxr5k-ieee8023` for COVID-Xray-5k's COVID-19
images and `chexpert` for its non-COVID ones: a column to balance by, in which COVID-Xray-5k's two one-class sites
are down-weighted), view, in_cxr5k_train. A COVID-Xray-5k image from the same web page (url) as pack images takes
the patient of one of them, so holding out that pack source also takes it out of training (no near-duplicate of a
held-out image trains).
"""

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr.data import labelled_files

cxr5k, pack_csv, out = sys.argv[1:]
pack = list(csv.DictReader(open(pack_csv, newline="")))
patient_of_url: dict[str, str] = {}
for r in pack:
    patient_of_url.setdefault(r["url"], r["patient"])
meta = {
    r["filename"]: r
    for r in csv.DictReader(
        open(os.path.join(cxr5k, "SOURCE", "covid_images_ieee8023_metadata.tsv"), newline=""), delimiter="\t"
    )
}
columns = ["path", "label", "patient", "source", "site", "view", "in_cxr5k_train"]
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    linked = 0
    for lf in labelled_files(cxr5k, "train"):
        name = os.path.basename(lf.path)
        if lf.label == 1:
            m = meta.get(name, {})
            url = m.get("url") or name
            linked += url in patient_of_url
            patient = patient_of_url.get(url, f"cxr5k:{url}")
            w.writerow(
                {
                    "path": lf.path,
                    "label": "covid",
                    "patient": patient,
                    "site": "cxr5k-ieee8023",
                    "view": m.get("view", ""),
                }
            )
        else:
            w.writerow({"path": lf.path, "label": "non", "patient": lf.group, "site": "chexpert", "view": ""})
    base = os.path.dirname(os.path.abspath(pack_csv))
    for r in pack:
        w.writerow(
            {
                "path": os.path.join(base, r["path"]),
                "label": r["label"],
                "patient": r["patient"],
                "source": r["source"],
                "site": r["source"],
                "view": r["view"],
                "in_cxr5k_train": r["in_cxr5k_train"],
            }
        )
print(
    f"{out}: COVID-Xray-5k train + {len(pack)} pack rows; {linked} COVID-Xray-5k images share a pack case",
    file=sys.stderr,
)
