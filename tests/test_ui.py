"""`bench ui` serves the workspace's MLflow store over HTTP on the loopback interface."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from bench.tracking import Workspace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_ui_serves_the_workspace_experiment(tmp_path):
    ws = Workspace(tmp_path / "ws")
    exp_id = ws.experiment_id()
    ws.client.create_run(exp_id, tags={"method": "vanilla"})
    port = free_port()
    bench = shutil.which("bench") or str(Path(__file__).resolve().parents[1] / ".venv/bin/bench")
    proc = subprocess.Popen([bench, "ui", "--workspace", str(ws.root), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=thyrobench"
    try:
        deadline, body = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.load(response)
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the MLflow UI did not answer within 90 s"
        assert body["experiment"]["experiment_id"] == exp_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
        proc.wait(timeout=30)
