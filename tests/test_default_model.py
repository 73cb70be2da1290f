"""The shipped default model: loads offline by name, carries its provenance, and scores the bundled samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr.checkpoint import default_model_path, load_checkpoint
from cxr.decode import decode
from cxr.preprocess import preprocess

SAMPLES = Path(default_model_path()).parents[1] / "samples"


def test_default_model_is_complete_and_documented():
    info = load_checkpoint("default").info
    assert info.backbone == "mobilenet_v2" and info.class_names == ("non", "covid")
    assert 0 < info.threshold < 1 and info.preprocess.input_size == 224
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
    # The three COVID-19 samples (another hospital than the training data) score above the three normal ones.
    covid = [pr for p, pr in zip(files, prob) if p.parent.name == "covid"]
    normal = [pr for p, pr in zip(files, prob) if p.parent.name == "non"]
    assert min(covid) > max(normal), (covid, normal)
