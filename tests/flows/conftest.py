"""Flow fixtures: an in-process Prefect API (prefect_test_harness) per test module, its home in a temp dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # flow_helpers, for the test modules


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_HOME,
                                  PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings)
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={
        PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home")), PREFECT_API_URL: None,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }):
        with prefect_test_harness(server_startup_timeout=120):
            yield

