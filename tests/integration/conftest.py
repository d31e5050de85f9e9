"""Fixtures of the integration tests: the session's local Ray + Serve (see serve_harness)."""

from __future__ import annotations

import pytest

from tests.integration import serve_harness


@pytest.fixture(scope="session")
def serve_cluster():
    cluster = serve_harness.acquire()
    yield cluster
    serve_harness.release()
