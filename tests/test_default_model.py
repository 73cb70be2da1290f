"""The shipped default model: loads offline by name, carries its provenance, and scores the bundled samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr.checkpoint import default_model_path, load_checkpoint
from cxr.decode import decode
from cxr.preprocess import preprocess

SAMPLES = Path(default_model_path()).parents[1] / "samples"


def test_default_model_is_complete_and_documented():
    info = load_checkpoint("default").info
    assert info.backbone == "mobilenet_v2" and info.class_names == ("non", "covid")
    assert 0 < info.threshold < 1 and info.preprocess.input_size == 128 and info.preprocess.crop is not None
    prov = info.provenance
    assert prov["data"]["counts"] == {"non": 2000, "covid": 82}
    assert prov["validation"]["val_sens_at_threshold"] >= 0.98
    card = (Path(default_model_path()) / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card and info.model_id in card


def test_default_model_scores_the_bundled_samples():
    loaded = load_checkpoint("default")
    files = sorted(p for p in SAMPLES.rglob("*") if p.suffix in (".png", ".jpeg"))
    assert len(files) == 6
    images = np.stack([preprocess(decode(p.read_bytes(), p.name).image, loaded.info.preprocess) for p in files])
    prob = loaded.predict_proba(images)
    assert prob.shape == (6,) and np.all((prob >= 0) & (prob <= 1))
    # The table README.md shows (demo.sh): scoring reproduces it, so the preprocessing recorded in the
    # checkpoint (lung crop, 128 px) is what runs. (Right on these six; poor on the whole external sets, as documented.)
    documented = {
        "006f3a8a.png": 0.063773,
        "00870a9c.png": 0.989777,
        "00d96e05.png": 0.689066,
        "IM-0001-0001.jpeg": 0.000140,
        "IM-0003-0001.jpeg": 0.001134,
        "IM-0005-0001.jpeg": 0.000468,
    }
    got = {p.name: float(pr) for p, pr in zip(files, prob)}
    assert got == {k: pytest.approx(v, abs=2e-4) for k, v in documented.items()}
    assert loaded.info.threshold == pytest.approx(0.020230, abs=1e-6)
