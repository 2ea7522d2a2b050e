"""``ktoloop serve``: the deployments with their schedules, and the drift trigger, served by this process.

The ephemeral Prefect API runs no scheduler, so when no ``PREFECT_API_URL`` is configured a local
``prefect server`` is started on 127.0.0.1 (its UI shows the runs) and stopped when serving ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ktoloop.config import Settings, load_section
from ktoloop.errors import KtoLoopError

RETRAIN_TRIGGER = "retrain-on-drift"


def deployments(settings: Settings) -> list:
    """drain (interval), monitor (interval), retrain (nightly cron + the ``kto.drift.detected`` trigger)."""
    from prefect.events import DeploymentEventTrigger

    from flows.loop import LoopConfig
    from flows.prefect_flows import DRIFT_EVENT, drain_flow, monitor_flow, retrain_flow

    loop = load_section(settings, "flows", LoopConfig)
    drift = DeploymentEventTrigger(
        name=RETRAIN_TRIGGER, expect={DRIFT_EVENT}, match={"prefect.resource.id": "ktoloop.*"},
        parameters={"reason": "{{ event.payload.reason }}"},
    )
    return [
        drain_flow.to_deployment(name="ktoloop", interval=loop.drain_interval_s),
        monitor_flow.to_deployment(name="ktoloop", interval=loop.monitor_interval_s),
        retrain_flow.to_deployment(name="ktoloop", cron=loop.retrain_cron, parameters={"reason": "nightly"},
                                   triggers=[drift]),
    ]


def start_local_server(home: Path, port: int, timeout_s: float = 90.0) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:port with its database under ``home``; waits for /api/health."""
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--analytics-off"], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KtoLoopError(f"prefect server exited with {proc.returncode}; see {home / 'server.log'}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise KtoLoopError(f"prefect server not healthy at {url} within {timeout_s:.0f} s; see {home / 'server.log'}")


def serve_deployments(settings: Settings, api_port: int = 4200) -> None:
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        server = start_local_server(settings.home_dir / "prefect-server", api_port)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{api_port}/api"
        print(f"started a local Prefect server: UI at http://127.0.0.1:{api_port} "
              f"(log {settings.home_dir / 'prefect-server' / 'server.log'})", flush=True)
    from prefect import serve

    try:
        print("serving drain/ktoloop, monitor/ktoloop, retrain/ktoloop (nightly + on kto.drift.detected); "
              "run one by hand with: prefect deployment run 'retrain/ktoloop' -p 'reason=\"manual\"'", flush=True)
        serve(*deployments(settings))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
