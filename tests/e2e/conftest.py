"""Fixtures of the end-to-end tests: the session's local Ray + Serve, shared with the
integration tests when both run in one session (see tests/integration/serve_harness.py)."""

from __future__ import annotations

import pytest

from tests.integration import serve_harness


@pytest.fixture(scope="session")
def serve_cluster():
    cluster = serve_harness.acquire()
    yield cluster
    serve_harness.release()
