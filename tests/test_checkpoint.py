"""Tests for cxr.checkpoint: save/load (local and S3), model.json validation, hashes, optimisation, calibration."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cxr
from cxr import checkpoint
from cxr.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    LoadedModel,
    ModelInfo,
    default_model_path,
    load_checkpoint,
    load_info,
    resolve,
    save_checkpoint,
)
from cxr.models import create_model
from cxr.preprocess import PreprocessSpec, to_model_input
from support.payloads import PicklePayload

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a busy 2-core machine spinning threads
    make each forward pass ~50x slower. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Like a trained model: BN running statistics measured on data, non-trivial affine terms, so that
    BN folding and weight loading really matter (and activations stay in a sane range)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        model.train()(torch.rand(4, 3, SIZE, SIZE, generator=g) * 4 - 2)
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def _model(name: str = "mobilenet_v2", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_batchnorm(create_model(name, weights="none"), seed)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((4, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, info, path) of a saved mobilenet_v2 checkpoint at 64 px."""
    model = _model()
    info = ModelInfo("mobilenet_v2", PreprocessSpec(input_size=SIZE), threshold=0.37)
    path = str(tmp_path_factory.mktemp("ckpt") / "m")
    info = save_checkpoint(model, info, path)
    return model, info, path


def _edit_json(path: str, **changes) -> dict:
    meta = Path(path) / META_FILE
    d = json.loads(meta.read_text())
    d.update(changes)
    meta.write_text(json.dumps(d))
    return d


def _copy_checkpoint(src: str, dst: Path) -> str:
    dst.mkdir(parents=True)
    for name in (WEIGHTS_FILE, META_FILE):
        (dst / name).write_bytes((Path(src) / name).read_bytes())
    return str(dst)


# ------------------------------------------------------------------ round trips


def test_round_trip_gives_identical_probabilities(saved, images):
    model, info, path = saved
    assert sorted(os.listdir(path)) == sorted([WEIGHTS_FILE, META_FILE])
    direct = LoadedModel(model, info, optimize=False).predict_proba(images)
    loaded = load_checkpoint(path, optimize=False)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    probs = loaded.predict_proba(images)
    assert probs.dtype == np.float32 and probs.shape == (4,)
    np.testing.assert_array_equal(probs, direct)
    assert len(set(np.round(probs, 6).tolist())) > 1  # the images are told apart
    np.testing.assert_allclose(load_checkpoint(path).predict_proba(images), direct, atol=1e-4)


def test_model_info_round_trip(tmp_path):
    spec = PreprocessSpec(input_size=96, autocontrast=None, channels=1, mean=(0.5,), std=(0.25,))
    info = ModelInfo(
        "mobilenet_v2",
        spec,
        class_names=("normal", "covid19"),
        positive_class="covid19",
        threshold=0.3,
        temperature=1.7,
        provenance={"data": {"fingerprint": "abc123"}, "metrics": {"auc": 0.91}},
        tta="hflip",
    )
    saved = save_checkpoint(create_model("mobilenet_v2"), info, str(tmp_path / "m"))
    raw = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION
    assert raw["num_classes"] == 2

    back = load_info(str(tmp_path / "m"))
    assert back.backbone == "mobilenet_v2"
    assert back.class_names == ("normal", "covid19")
    assert back.positive_class == "covid19" and back.positive_index == 1
    assert back.preprocess == spec
    assert back.threshold == 0.3 and back.temperature == 1.7 and back.tta == "hflip"
    assert back.provenance["data"] == {"fingerprint": "abc123"}
    assert back.provenance["metrics"] == {"auc": 0.91}
    assert back.provenance["created_at"]
    versions = back.provenance["versions"]
    import ray

    assert versions["torch"] == torch.__version__
    assert versions["ray"] == ray.__version__
    assert versions["cxr"] == cxr.__version__
    assert back.weights_sha256 == saved.weights_sha256
    assert ModelInfo.from_dict(back.to_dict()) == back


def test_positive_index_follows_class_names():
    info = ModelInfo("mobilenet_v2", class_names=("covid", "non"), positive_class="covid")
    assert info.positive_index == 0


def test_model_id_is_backbone_and_weights_hash(saved):
    _, info, path = saved
    digest = hashlib.sha256((Path(path) / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert info.weights_sha256 == digest
    assert info.model_id == f"mobilenet_v2@{digest[:12]}"
    assert load_info(path).model_id == info.model_id
    assert load_checkpoint(path, optimize=False).info.model_id == info.model_id


# ------------------------------------------------------------------ corrupt / invalid checkpoints


def test_modified_weights_rejected(saved, tmp_path):
    _, _, path = saved
    copy = _copy_checkpoint(path, tmp_path / "m")
    weights = Path(copy) / WEIGHTS_FILE
    blob = bytearray(weights.read_bytes())
    mid = len(blob) // 2
    blob[mid : mid + 4] = bytes(b ^ 0xFF for b in blob[mid : mid + 4])
    weights.write_bytes(bytes(blob))
    load_info(copy)  # the metadata alone is still fine
    with pytest.raises(CheckpointError, match="hash"):
        load_checkpoint(copy)


def _valid_dict(saved) -> dict:
    return json.loads((Path(saved[2]) / META_FILE).read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something-else"}, "not a cxr-checkpoint"),
        ({"format_version": FORMAT_VERSION + 1}, "newer"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"positive_class": "pneumonia"}, "positive_class"),
        ({"preprocess": {"input_size": 4}}, "invalid model.json"),
        ({"threshold": None}, "invalid model.json"),
        ({"tta": "rotate90"}, "test-time augmentation"),
    ],
)
def test_invalid_model_json_rejected(saved, tmp_path, change, message):
    d = {**_valid_dict(saved), **change}
    (tmp_path / META_FILE).write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=message):
        load_info(str(tmp_path))


def test_model_json_missing_key_rejected(saved, tmp_path):
    d = _valid_dict(saved)
    del d["backbone"]
    (tmp_path / META_FILE).write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="invalid model.json"):
        load_info(str(tmp_path))


def test_model_json_not_json(tmp_path):
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_info(str(tmp_path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_info(str(tmp_path / "nowhere"))
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path / "nowhere"))


def test_missing_weights_file(saved, tmp_path):
    copy = _copy_checkpoint(saved[2], tmp_path / "m")
    os.remove(Path(copy) / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(copy)


def test_weights_for_another_backbone_rejected(saved, tmp_path):
    copy = _copy_checkpoint(saved[2], tmp_path / "m")
    _edit_json(copy, backbone="efficientnet_b0")
    with pytest.raises(CheckpointError, match="do not fit backbone efficientnet_b0"):
        load_checkpoint(copy)


def test_any_other_failure_is_a_checkpoint_error_naming_the_model(saved, monkeypatch):
    """What the jobs turn into exit code 4: not a traceback from deep inside torch or storage."""
    import cxr.checkpoint as ckpt

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while building the model")

    monkeypatch.setattr(ckpt, "LoadedModel", broken)
    with pytest.raises(CheckpointError, match=r"cannot load model .*out of memory while building"):
        load_checkpoint(saved[2])


@pytest.mark.parametrize("hash_matches", [True, False])
def test_pickle_disguised_as_safetensors_never_unpickled(saved, tmp_path, hash_matches):
    copy = _copy_checkpoint(saved[2], tmp_path / "m")
    marker = tmp_path / "payload-ran"
    weights = Path(copy) / WEIGHTS_FILE
    torch.save({"features.0.0.weight": PicklePayload(marker)}, weights)
    if hash_matches:  # an attacker who also rewrote model.json
        _edit_json(copy, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="do not fit" if hash_matches else "hash"):
        load_checkpoint(copy)
    assert not marker.exists()


# ------------------------------------------------------------------ S3


def test_save_and_load_s3(s3_bucket, saved, images):
    bucket, client = s3_bucket
    model, _, local = saved
    uri = f"s3://{bucket}/models/run1"
    info = save_checkpoint(model, ModelInfo("mobilenet_v2", PreprocessSpec(input_size=SIZE), threshold=0.37), uri)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="models/run1/")["Contents"])
    assert keys == sorted(f"models/run1/{n}" for n in (META_FILE, WEIGHTS_FILE))
    body = client.get_object(Bucket=bucket, Key=f"models/run1/{WEIGHTS_FILE}")["Body"].read()
    assert body == (Path(local) / WEIGHTS_FILE).read_bytes()

    from_s3 = load_checkpoint(uri, optimize=False)
    from_disk = load_checkpoint(local, optimize=False)
    assert from_s3.info.model_id == from_disk.info.model_id == info.model_id
    assert from_s3.info.threshold == 0.37
    np.testing.assert_array_equal(from_s3.predict_proba(images), from_disk.predict_proba(images))
    assert load_info(uri + "/").preprocess == PreprocessSpec(input_size=SIZE)


def test_missing_s3_checkpoint(s3_bucket):
    bucket, _ = s3_bucket
    with pytest.raises(CheckpointError, match="cannot read"):
        load_info(f"s3://{bucket}/no/such/model")


# ------------------------------------------------------------------ inference options


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50"])
def test_optimize_matches_unoptimised(backbone, images):
    model = _model(backbone, seed=3)
    info = ModelInfo(backbone, PreprocessSpec(input_size=SIZE))
    fast = LoadedModel(model, info, optimize=True)
    plain = LoadedModel(model, info, optimize=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.model.modules())  # BN really folded
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules())
    p_fast, p_plain = fast.predict_proba(images), plain.predict_proba(images)
    assert np.abs(p_fast - p_plain).max() <= 1e-4
    assert np.ptp(p_plain) > 1e-3  # a meaningful comparison, not constant outputs


def test_mixed_precision_matches_float32():
    """The GPU path's autocast (bf16) + channels-last, run on CPU with the shipped (trained) model on its
    bundled real X-rays: the same probabilities within bf16 tolerance, and the convolutions really ran
    in bfloat16."""
    from cxr.decode import decode
    from cxr.preprocess import preprocess

    plain = load_checkpoint("default", optimize=False)
    mixed = load_checkpoint("default", precision="bf16")
    assert plain.amp_dtype is None and mixed.amp_dtype == torch.bfloat16  # "auto" on CPU stays float32
    samples = Path(default_model_path()).parents[1] / "samples"
    files = sorted(p for p in samples.rglob("*") if p.suffix in (".png", ".jpeg"))
    images = np.stack([preprocess(decode(p.read_bytes(), p.name).image, plain.info.preprocess) for p in files])
    seen = []
    conv = next(m for m in mixed.model.modules() if isinstance(m, nn.Conv2d))
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    p_mixed = mixed.predict_proba(images)
    handle.remove()
    p_plain = plain.predict_proba(images)
    assert seen == [torch.bfloat16] and p_mixed.dtype == np.float32
    assert np.ptp(p_plain) > 0.1  # a meaningful comparison, not constant outputs
    assert np.abs(p_mixed - p_plain).max() <= 0.02, (p_mixed, p_plain)
    threshold = plain.info.threshold
    assert ((p_mixed >= threshold) == (p_plain >= threshold)).all()


def test_precision_validated(saved):
    _, _, path = saved
    with pytest.raises(ValueError, match="precision must be one of"):
        load_checkpoint(path, precision="int8")
    assert load_checkpoint(path, precision="fp16").amp_dtype == torch.float16


def test_temperature_scales_logits(saved, tmp_path, images):
    model, _, path = saved
    copy = _copy_checkpoint(path, tmp_path / "m")
    _edit_json(copy, temperature=2.0)
    loaded = load_checkpoint(copy, optimize=False)
    assert loaded.info.temperature == 2.0
    with torch.no_grad():
        logits = model.eval()(to_model_input(images, loaded.info.preprocess))
    expected = torch.softmax(logits / 2.0, dim=1)[:, 1].numpy()
    uncalibrated = torch.softmax(logits, dim=1)[:, 1].numpy()
    probs = loaded.predict_proba(images)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert np.abs(probs - uncalibrated).max() > 1e-5  # T=2 made a difference
    np.testing.assert_allclose(load_checkpoint(path, optimize=False).predict_proba(images), uncalibrated, atol=1e-6)


def test_tta_hflip_averages_the_logits_of_the_image_and_its_mirror(saved, tmp_path, images):
    model, _, path = saved
    plain = load_checkpoint(path)
    assert plain.info.tta == "none" and _valid_dict(saved)["format_version"] == 1  # older code reads it
    copy = _copy_checkpoint(path, tmp_path / "m")
    _edit_json(copy, tta="hflip", format_version=2)
    loaded = load_checkpoint(copy)  # optimised (BN folded), as scoring loads it
    assert loaded.info.tta == "hflip"
    x = to_model_input(images, loaded.info.preprocess)
    with torch.no_grad():
        logits = (model.eval()(x) + model(x.flip(-1))) / 2
    np.testing.assert_allclose(loaded.predict_proba(images), torch.softmax(logits, 1)[:, 1].numpy(), atol=1e-5)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    np.testing.assert_allclose(
        loaded.predict_proba(mirrored), loaded.predict_proba(images), atol=1e-5
    )  # mirror-invariant
    assert (
        np.abs(plain.predict_proba(mirrored) - plain.predict_proba(images)).max() > 1e-4
    )  # which the model alone is not
    # Saved again, the checkpoint says it needs a reader that knows TTA (format 2): older code refuses it
    # rather than scoring without the augmentation its threshold was chosen with.
    again = save_checkpoint(
        model, ModelInfo("mobilenet_v2", PreprocessSpec(input_size=SIZE), tta="hflip"), str(tmp_path / "again")
    )
    d = json.loads((tmp_path / "again" / META_FILE).read_text())
    assert (d["tta"], d["format_version"], again.tta) == ("hflip", 2, "hflip")


def test_resolve_default_points_into_package():
    package = Path(cxr.__file__).resolve().parent
    assert Path(resolve("default")) == package / "assets" / "models" / "default"
    assert resolve("default") == default_model_path() == checkpoint.default_model_path()
    assert resolve("s3://bucket/model") == "s3://bucket/model"
    assert resolve("/some/dir") == "/some/dir"
