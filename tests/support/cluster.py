"""A real multi-node local Ray cluster started with ``ray start`` (head and workers on 127.0.0.1), and free ports."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .jobs import PYTHON, RAY

_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free port not handed out before in this session (the OS may offer a just-closed one again,
    and two Ray components given the same port make `ray start` fail)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


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
        self.port = free_port()
        self.dashboard_port = free_port()
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
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={head_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            *common,
        )
        self.add_worker(worker_cpus)
        self.wait_for_nodes(2)

    @staticmethod
    def _agent_ports() -> list[str]:
        """Ports of a node's agents: distinct per node, as two nodes share this machine (the defaults collide
        and the head's job agent then never becomes available to `ray job submit`)."""
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]

    def _ray(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if out.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args[:2])} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        return out.stdout

    def add_worker(self, cpus: int) -> None:
        self._ray(
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--object-store-memory",
            str(400 * 1024**2),
            *self._agent_ports(),
        )

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(
                [
                    PYTHON,
                    "-c",
                    f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                    "print('ALIVE', sum(1 for n in ray.nodes() if n['Alive']))",
                ],  # Ray may print warnings to stdout too
                capture_output=True,
                text=True,
                timeout=60,
            )
            alive = re.findall(r"^ALIVE (\d+)$", out.stdout, re.M)
            if out.returncode == 0 and alive and int(alive[-1]) >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"cluster did not reach {n} nodes")

    def stop(self) -> None:
        _kill_tree_under(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
