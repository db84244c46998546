"""The ``deployment`` fixture: a ``Processes`` (server/ops/loopback.py) in the test's tmp_path
whose every process is stopped by PID afterwards, also on failure; none may be left."""

import json
import time

import pytest

from deployment import Processes


@pytest.fixture
def deployment(tmp_path):
    dep = Processes(tmp_path)
    try:
        yield dep
    finally:
        left = dep.stop()
        assert left == [], f"processes left after teardown: {left}"


@pytest.fixture
def figures(request):
    """A dict the test fills with what it measured; printed, and recorded under the test's name
    (``deployment.record_figures``) with ``passed`` and the test's wall time, also when it failed
    (but not when it measured nothing: an interrupted test does not overwrite an earlier record)."""
    from deployment import record_figures

    out: dict = {}
    t0 = time.monotonic()
    yield out
    out["passed"] = bool(out.pop("_passed", False))
    out["test_wall_s"] = round(time.monotonic() - t0, 1)
    print(f"\n{request.node.name}: {json.dumps(out, default=str)}")
    if set(out) - {"passed", "test_wall_s"}:  # a test stopped before it measured anything keeps the last record
        record_figures(request.node.name, out)
