"""``ktoloop serve``: the deployments with their schedules, and the drift trigger, served by this process.

Prefect reads its settings (the API URL among them) once, when it is first imported, into a process-wide
context: an API URL put into ``os.environ`` afterwards is not seen, and Prefect quietly starts a temporary
server of its own on another port. So the API is settled first (the configured one, or a local
``prefect server`` on 127.0.0.1 started here), then written to the environment (for the flow-run processes
and the ``prefect`` CLI) and into Prefect's global settings, and only then are the deployments built.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ktoloop.config import Settings, load_section
from ktoloop.errors import KtoLoopError

RETRAIN_TRIGGER = "retrain-on-drift"
# the UI finds its API through these; a user's values for another server must not reach the one started here
_SERVER_ENV_DROPPED = ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL", "PREFECT_PROFILE")


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


def local_api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def start_local_server(home: Path, port: int, timeout_s: float = 90.0) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:port with its database under ``home``; waits for /api/health.

    Its own session, so a Ctrl-C meant for ``ktoloop serve`` leaves it up until serving has paused the
    schedules; ``stop_local_server`` ends it."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise KtoLoopError(f"port 127.0.0.1:{port} is in use; pass --api-port with a free port, or set "
                               f"PREFECT_API_URL={local_api_url(port)} if a Prefect server runs there") from None
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV_DROPPED}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_UI_API_URL=local_api_url(port))  # else the UI calls :4200 whatever --port says
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--analytics-off"], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise KtoLoopError(f"prefect server exited with {proc.returncode}; see {home / 'server.log'}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return proc
            except OSError:
                time.sleep(0.5)
        raise KtoLoopError(f"prefect server not healthy at {url} within {timeout_s:.0f} s; "
                           f"see {home / 'server.log'}")
    except BaseException:
        stop_local_server(proc)
        raise


def stop_local_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def configured_api_url() -> str | None:
    """The API URL Prefect would use (``PREFECT_API_URL`` or the active profile); None: none configured."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def use_api(api_url: str) -> None:
    """Point this process (its global Prefect settings), its flow-run processes and the CLI at ``api_url``."""
    os.environ["PREFECT_API_URL"] = api_url
    if "prefect.context" in sys.modules:  # already imported: its settings were read before the URL was known
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def check_api(api_url: str) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise KtoLoopError(f"no Prefect API at PREFECT_API_URL={api_url} ({failure}); start that server, or "
                           "unset PREFECT_API_URL to let `ktoloop serve` start one on 127.0.0.1")


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def serve_deployments(settings: Settings, api_port: int = 4200) -> None:
    """Serve on the configured Prefect API, or on a local server started (and stopped) here."""
    signal.signal(signal.SIGTERM, _stop)  # until Prefect's runner installs its own: never orphan the server
    server = None
    api_url = configured_api_url()
    if api_url is None:
        home = settings.home_dir / "prefect-server"
        server = start_local_server(home, api_port)
        api_url = local_api_url(api_port)
        print(f"started a local Prefect server: UI at http://127.0.0.1:{api_port} (log {home / 'server.log'})",
              flush=True)
    try:
        use_api(api_url)
        check_api(api_url)
        from prefect import serve

        served = deployments(settings)
        print(f"serving drain/ktoloop, monitor/ktoloop, retrain/ktoloop (nightly + on kto.drift.detected) at "
              f"{api_url}; run one by hand with:\n"
              f"  PREFECT_API_URL={api_url} prefect deployment run 'retrain/ktoloop' -p 'reason=\"manual\"'",
              flush=True)
        serve(*served)
    finally:
        if server is not None:
            stop_local_server(server)
            print(f"stopped the local Prefect server on 127.0.0.1:{api_port}", flush=True)
