"""``ktoloop serve`` as a user runs it: a subprocess against a real ``prefect server`` on a free loopback port,
triggered with the README's ``prefect deployment run`` command and by the monitor's drift event."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.flows.test_prefect_flows import feedback, land_events, write_config

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
MANUAL = ["deployment", "run", "retrain/ktoloop", "-p", 'reason="manual"']  # the README's command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def served_config(tmp_path: Path, **kwargs) -> Path:
    """The tiny-model config, trimmed (4 steps, 8 benchmark items), with schedules far enough out that only
    the runs a test starts run."""
    config = write_config(tmp_path, lr=2e-3, **kwargs)
    text = config.read_text().replace("max_steps = 12", "max_steps = 4")
    text = text.replace("wikitext2 = 3, arc_easy = 20", "arc_easy = 8")
    config.write_text(text + "drain_interval_s = 86400\nmonitor_interval_s = 86400\n")
    return config


def user_env(tmp_path: Path, config: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KTOLOOP_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-client"), KTOLOOP_CONFIG=str(config), PYTHONPATH=str(ROOT))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def ktoloop_serve(tmp_path: Path, env: dict[str, str], *args: str):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ktoloop.cli", "serve", *args], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def client_of(api_url: str):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def wait_for(what: str, check, timeout_s: float, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                         + (f"; serve log:\n{log.read_text()[-4000:]}" if log else ""))


def served_deployments(api_url: str) -> set[str]:
    with client_of(api_url) as client:
        return {client.read_flow(d.flow_id).name + "/" + d.name for d in client.read_deployments()}


def deployed(api_url: str, port: int) -> bool:
    return healthy(port) and served_deployments(api_url) == {"drain/ktoloop", "monitor/ktoloop", "retrain/ktoloop"}


def runs_of(api_url: str, deployment: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with client_of(api_url) as client:
        flow_name, name = deployment.split("/")
        dep = client.read_deployment_by_name(f"{flow_name}/{name}")
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def finished(api_url: str, deployment: str, n: int):
    runs = runs_of(api_url, deployment)
    done = [r for r in runs if r.state and r.state.is_final()]
    return done if len(done) >= n else None


def logs_and_artifact(api_url: str, run_id):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with client_of(api_url) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-gate"])),
                                          flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return logs, artifacts


def prefect_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([PREFECT, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            found.append((child, (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
        todo += children.get(child, [])
    return found


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture()
def pinned_home(tmp_path, tiny_model_dir):
    from training.reference import pin_reference

    pin_reference(tiny_model_dir, "tiny-v1", tmp_path / "home")
    return tmp_path


def test_serve_without_an_api_url_starts_one_local_server_holding_the_deployments_and_stops_it(pinned_home):
    """The default path: serve starts exactly one server on the advertised port, its UI calls that port,
    the printed manual command runs a retrain there to completion, and SIGTERM takes the server down."""
    tmp_path = pinned_home
    land_events(tmp_path / "home" / "ktoloop.duckdb", feedback(100))  # too little data: the retrain skips fast
    config = served_config(tmp_path)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    with ktoloop_serve(tmp_path, user_env(tmp_path, config), "--api-port", str(port)) as (proc, log):
        wait_for("the deployments on the advertised port", lambda: deployed(api_url, port), 150, log)
        text = log.read_text()
        assert f"UI at http://127.0.0.1:{port}" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=5) as response:
            assert f'"api_url":"{api_url}"' in response.read().decode()
        servers = [(pid, c) for pid, c in descendants(proc.pid) if "prefect server start" in c or "uvicorn" in c]
        assert len(servers) == 1 and f"--port {port}" in servers[0][1], servers  # no temporary second server

        command = re.search(r"^\s*(PREFECT_API_URL=\S+ prefect deployment run .*)$", text, re.MULTILINE).group(1)
        assert command == f"""PREFECT_API_URL={api_url} prefect deployment run 'retrain/ktoloop' -p 'reason="manual"'"""
        prefect_cli({**user_env(tmp_path, config), "PREFECT_API_URL": api_url}, *MANUAL)
        [run] = wait_for("the manual retrain", lambda: finished(api_url, "retrain/ktoloop", 1), 150, log)
        assert run.state.is_completed(), (run.state, log.read_text()[-4000:])

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    assert not healthy(port)
    assert not Path(f"/proc/{servers[0][0]}").exists()


def test_served_retrains_by_hand_and_on_drift_carry_ktoloop_logs_and_the_gate_artifact(pinned_home):
    """Against an external server (PREFECT_API_URL): the README's manual command trains and judges a candidate;
    the drift event then starts a retrain, which either says the same snapshot is already decided (rejected)
    or, after a promotion, follows the new model and finds none of its feedback yet."""
    from flows.prefect_flows import DRIFT_EVENT
    from flows.serving import start_local_server, stop_local_server

    tmp_path = pinned_home
    land_events(tmp_path / "home" / "ktoloop.duckdb", feedback(200))
    config = served_config(tmp_path, min_examples=200)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server = start_local_server(tmp_path / "prefect-server", port)
    try:
        env = user_env(tmp_path, config, api_url)
        with ktoloop_serve(tmp_path, env) as (_, log):
            wait_for("the deployments", lambda: deployed(api_url, port), 150, log)
            assert "started a local Prefect server" not in log.read_text()

            prefect_cli(env, *MANUAL)
            [manual] = wait_for("the manual retrain", lambda: finished(api_url, "retrain/ktoloop", 1), 240, log)
            assert manual.state.is_completed() and manual.parameters == {"reason": "manual"}, manual.state
            logs, [artifact] = logs_and_artifact(api_url, manual.id)
            names = {entry.name.split(".")[0] for entry in logs}
            assert {"training", "monitoring"} <= names, sorted({entry.name for entry in logs})
            assert "### Preference vs the reference" in artifact.data and "### Capability" in artifact.data
            verdict = re.search(r"Gate: `(PROMOTE|REJECT) \|", artifact.data)
            assert verdict, artifact.data

            # the event the monitor flow emits on drift (its cooldown is tested in test_prefect_flows)
            prefect_cli(env, "event", "emit", DRIFT_EVENT, "--resource-id", "ktoloop.monitor",
                        "--payload", json.dumps({"reason": "drift: thumbs_up_rate (test)"}))
            runs = wait_for("the drift retrain", lambda: finished(api_url, "retrain/ktoloop", 2), 150, log)
            [drift] = [r for r in runs if r.id != manual.id]
            assert drift.state.is_completed() and drift.parameters == {"reason": "drift: thumbs_up_rate (test)"}
            expected = "already decided" if verdict.group(1) == "REJECT" else "0 usable training examples"
            deadline = time.monotonic() + 30
            while True:  # run logs reach the API in batches
                logs, [artifact] = logs_and_artifact(api_url, drift.id)
                if any(expected in entry.message for entry in logs) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert any(expected in entry.message for entry in logs), [e.message for e in logs]
            if verdict.group(1) == "REJECT":
                assert "(already decided)" in artifact.data
    finally:
        stop_local_server(server)
