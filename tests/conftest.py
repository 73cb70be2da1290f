"""Shared fixtures: a real multi-node local Ray cluster, a real S3-compatible server (moto, over HTTP on
127.0.0.1), generated chest-X-ray-like images (good and broken, every format), and tiny checkpoints.

Every Ray process the tests start lives under its own short --temp-dir and is killed in teardown.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RAY = str(Path(PYTHON).parent / "ray")


_GIVEN_PORTS: set[int] = set()


def _free_port() -> int:
    """A free port not handed out before in this session (the OS may offer a just-closed one again,
    and two Ray components given the same port make `ray start` fail)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


# Set before anything imports boto3/pyarrow/ray, so every process the tests start (Ray nodes,
# workers, job subprocesses) inherits the same offline, fake-credential S3 set-up.
S3_PORT = _free_port()
os.environ.update(
    {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray 2.60's token authentication, with a token of this test session's own (nothing written to ~/.ray).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "HF_HUB_OFFLINE": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "PYTHONPATH": str(ROOT / "lib") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
)


# --------------------------------------------------------------------------- S3 (moto server mode)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = "cxr-" + secrets.token_hex(4)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name, client


def upload_tree(client, bucket: str, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


# --------------------------------------------------------------------------- Ray cluster


def _uses(pid_dir: Path, marker: str) -> bool:
    """Whether the process mentions ``marker`` on its command line or holds a file under it open (Ray's dashboard
    and runtime-env agents retitle themselves ``ray::DashboardAgent``, and can outlive their raylet)."""
    try:
        if marker in (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
            return True
        fds = list((pid_dir / "fd").iterdir())
    except OSError:  # gone, or not ours to read
        return False
    for fd in fds:
        try:
            if marker in os.readlink(fd):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _kill_tree_under(marker: str) -> None:
    """SIGKILL every process that uses ``marker`` (our cluster's temp dir)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        if _uses(pid_dir, marker):
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except OSError:
                pass


class LocalCluster:
    """A head node and a worker node started with ``ray start`` on 127.0.0.1."""

    def __init__(self, head_cpus: int = 2, worker_cpus: int = 1):
        self.temp_dir = f"/tmp/cxrt-{secrets.token_hex(3)}"
        self.port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        common = ["--disable-usage-stats", "--object-store-memory", str(400 * 1024**2), *self._agent_ports()]
        try:
            self._start(head_cpus, worker_cpus, common)
        except BaseException:
            self.stop()
            raise

    def _start(self, head_cpus: int, worker_cpus: int, common: list[str]) -> None:
        self._ray(
            "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--num-cpus={head_cpus}",
            "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", *common,
        )
        self.add_worker(worker_cpus)
        self.wait_for_nodes(2)

    @staticmethod
    def _agent_ports() -> list[str]:
        """Ports of a node's agents: distinct per node, as two nodes share this machine (the defaults collide
        and the head's job agent then never becomes available to `ray job submit`)."""
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    def _ray(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if out.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args[:2])} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        return out.stdout

    def add_worker(self, cpus: int) -> None:
        self._ray(
            "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats", "--object-store-memory", str(400 * 1024**2), *self._agent_ports(),
        )

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(
                [PYTHON, "-c", f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                 "print('ALIVE', sum(1 for n in ray.nodes() if n['Alive']))"],  # Ray may print warnings to stdout too
                capture_output=True, text=True, timeout=60,
            )
            alive = re.findall(r"^ALIVE (\d+)$", out.stdout, re.M)
            if out.returncode == 0 and alive and int(alive[-1]) >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"cluster did not reach {n} nodes")

    def stop(self) -> None:
        _kill_tree_under(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This test process connected to the local cluster as a Ray driver."""
    import ray

    ray.init(address=ray_cluster.address, logging_level="ERROR")
    yield ray_cluster
    ray.shutdown()


# --------------------------------------------------------------------------- images and models


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def dicom_bytes(arr: np.ndarray, *, frames: int = 1, photometric: str = "MONOCHROME2", preamble: bool = True,
                view: str | None = None) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    if view is not None:
        ds.ViewPosition = view
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    data = np.stack([arr.astype(np.uint16)] * frames) if frames > 1 else arr.astype(np.uint16)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = data.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def compress_dicom(data: bytes, transfer_syntax: str) -> bytes:
    """``data`` (an uncompressed DICOM file) re-encoded by GDCM into ``transfer_syntax`` (a UID), the way a
    PACS export would: JPEG Lossless, JPEG-LS, JPEG 2000, RLE, or 12-bit lossy JPEG Extended."""
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.dcm"), os.path.join(tmp, "out.dcm")
        Path(src).write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(transfer_syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change(), f"GDCM cannot encode {transfer_syntax}"
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(dst)
        assert writer.Write()
        return Path(dst).read_bytes()


def xray_like(h: int, w: int, seed: int = 0, blob: bool = False) -> np.ndarray:
    """A smooth uint8 image; ``blob`` adds a bright disc (the synthetic 'finding')."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 80 + 60 * np.sin(x / w * np.pi) + rng.normal(0, 8, (h, w))
    if blob:
        img += 120 * (((y - h * 0.45) ** 2 + (x - w * 0.4) ** 2) < (min(h, w) * 0.18) ** 2)
    return np.clip(img, 0, 255).astype(np.uint8)


# name -> (bytes, expected error prefix or None, (width, height) for good files)
def mixed_files() -> dict[str, tuple[bytes, str | None, tuple[int, int] | None]]:
    gray = xray_like(90, 120, seed=1)
    rgb = np.stack([xray_like(80, 100, seed=2)] * 3, axis=-1)
    good_png = png_bytes(gray)
    files = {
        "good/a.png": (good_png, None, (120, 90)),
        "good/rgb.PNG": (png_bytes(rgb), None, (100, 80)),
        "good/nested/deeper/b.jpg": (jpeg_bytes(xray_like(70, 60, seed=3)), None, (60, 70)),
        "good/c.jpeg": (jpeg_bytes(rgb), None, (100, 80)),
        "good/d16.png": (png_bytes((gray.astype(np.uint16) * 257), "I;16"), None, (120, 90)),
        "good/scan.dcm": (dicom_bytes((gray.astype(np.uint16) * 16), view="PA"), None, (120, 90)),
        "good/inverted.dcm": (dicom_bytes((gray.astype(np.uint16) * 16), photometric="MONOCHROME1"), None, (120, 90)),
        "good/IM000001": (dicom_bytes((gray.astype(np.uint16) * 16)), None, (120, 90)),  # DICOM without extension
        # JPEG Lossless (Process 14, SV1): how PACS archives commonly store CR/DX images
        "good/lossless.dcm": (compress_dicom(dicom_bytes((gray.astype(np.uint16) * 16)), "1.2.840.10008.1.2.4.70"), None, (120, 90)),
        "bad/empty.png": (b"", "empty file", None),
        "bad/truncated.png": (good_png[: len(good_png) // 2], "truncated", None),
        "bad/text.jpg": (b"this is not an image\n" * 10, "not an image", None),
        "bad/multiframe.dcm": (dicom_bytes(gray.astype(np.uint16), frames=3), "multi-frame", None),
        "bad/lateral.dcm": (dicom_bytes((gray.astype(np.uint16) * 16), view="LL"), "not a frontal view", None),  # scored with all_views
    }
    return files


IGNORED = {"notes.txt": b"not an input", "README": b"no extension, not DICOM"}


def write_files(root: Path, files: dict) -> Path:
    for name, entry in {**files, **{k: (v, None, None) for k, v in IGNORED.items()}}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entry[0])
    return root


@pytest.fixture
def mixed_folder(tmp_path) -> tuple[Path, dict]:
    files = mixed_files()
    return write_files(tmp_path / "images", files), files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight mobilenet_v2 checkpoint at 64 px (fast on CPU), threshold 0.5."""
    import torch

    from cxr.checkpoint import ModelInfo, save_checkpoint
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("models") / "tiny")
    save_checkpoint(create_model("mobilenet_v2"), ModelInfo("mobilenet_v2", PreprocessSpec(input_size=64), threshold=0.5), path)
    return path


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a job that must find no network and an empty torch hub cache (HF_HUB_OFFLINE is set for all)."""
    proxy = "http://127.0.0.1:9"  # nothing listens there: every download fails at once
    return {"TORCH_HOME": str(tmp_path / "hub"), "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy,
            "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}


def run_job(script: str, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "jobs" / script), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=str(ROOT),
    )


def make_labelled_tree(root: Path, n: int = 30, size: int = 64, seed: int = 0, layout: str = "train") -> Path:
    """{layout}/{covid,non}/ of generated images: covid ones carry a bright disc (separable task)."""
    for cls, blob in (("covid", True), ("non", False)):
        d = root / layout / cls if layout else root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"{cls}{seed}-{i}.png").write_bytes(png_bytes(xray_like(size, size, seed=seed * 10_000 + i + (5000 if blob else 0), blob=blob)))
    return root


@pytest.fixture(scope="session")
def trained_model(ray_driver, tmp_path_factory):
    """A mobilenet_v2 fine-tuned from ImageNet weights for 3 epochs on the synthetic task (64 px)."""
    from cxr.train import TrainConfig, train

    root = tmp_path_factory.mktemp("train")
    data = make_labelled_tree(root / "data")
    cfg = TrainConfig(data=str(data), output=str(root / "run"), weights="imagenet", epochs=3, image_size=64, batch_size=16,
                      lr=1e-3, oversample=2, val_fraction=0.25)
    return train(cfg)


class PicklePayload:
    """Pickles as a call to os.system: unpickling it creates ``marker``. For tests that nothing unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import shlex

        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))
