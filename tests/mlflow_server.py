"""A real `mlflow server` on loopback: its own SQLite store, artifacts it serves from a folder no
client is told about, and a stop and a start on the same port (an outage, a maintenance restart)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, env: dict[str, str], app_name: str | None = None):
        self.root, self.env, self.app_name = root, env, app_name
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.proc = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> "MlflowServer":
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination",
            str(self.artifacts),
        ]
        if self.app_name:
            command += ["--app-name", self.app_name]
        # Without its GenAI job runners: a dozen worker processes lipdd never uses. In a session of
        # its own, so a stop takes the server's workers with it.
        self.proc = subprocess.Popen(
            command,
            cwd=self.root,
            start_new_session=True,
            env={**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "server.log", "ab"),
        )
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(
                        "mlflow server did not start:\n"
                        f"{(self.root / 'server.log').read_text()[-3000:]}"
                    )
                time.sleep(0.3)

    def stop(self) -> None:
        """As a crash does: no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
