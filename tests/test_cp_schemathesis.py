"""schemathesis against the published OpenAPI: generated (and malformed) requests to every operation, as admin,
against a real server on loopback, never get a 5xx. Bounded examples per operation so it stays well under 60 s."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Err

from _cp_support import CP

EXAMPLES = 12


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    d = tmp_path_factory.mktemp("fuzz")
    c = CP(d, f"sqlite:///{d / 'cp.db'}")
    yield c
    c.close()


def test_openapi_is_published_with_the_checkin_protocol(cp: CP) -> None:
    spec = cp.http.get("/openapi.json").json()
    paths = spec["paths"]
    assert "/api/v1/enroll" in paths and "/api/v1/devices/{device_id}/desired" in paths
    assert "/api/v1/devices/{device_id}/report" in paths
    # the report route reads its body itself (size cap first), yet documents the Report schema for generators
    report = paths["/api/v1/devices/{device_id}/report"]["post"]["requestBody"]["content"]["application/json"]
    assert report["schema"] == {"$ref": "#/components/schemas/Report"} and "Report" in spec["components"]["schemas"]


def test_no_5xx_on_generated_requests(cp: CP) -> None:
    raw = cp.http.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    device = cp.device("rpi4")
    failures: list[str] = []
    ops = []
    for r in schema.get_all_operations():
        if isinstance(r, Err):
            raise r.err()
        ops.append(r.ok())
    assert len(ops) > 20
    for op in ops:
        # device routes get the device credential (so generated bodies reach validation), the rest the admin's
        device_route = "/devices/{device_id}/" in op.path and op.path.endswith(("desired", "report"))
        _fuzz(cp, op, device.credential if device_route else cp.admin, failures)
    assert not failures, "\n".join(failures[:20])


def _fuzz(cp: CP, op: Any, token: str, failures: list[str]) -> None:
    method = op.method.upper()

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(case=op.as_strategy(), raw_body=st.binary(max_size=64))
    def run(case: schemathesis.Case, raw_body: bytes) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        r = case.call(base_url=cp.url, headers=headers)
        if r.status_code >= 500:
            failures.append(f"{method} {case.formatted_path} -> {r.status_code}: {r.text[:200]}")
        if method in ("POST", "PUT"):  # malformed: bytes that are not JSON at all
            m = cp.http.request(
                method, case.formatted_path, content=raw_body, headers={**headers, "Content-Type": "application/json"}
            )
            if m.status_code >= 500:
                failures.append(f"malformed {method} {case.formatted_path} -> {m.status_code}")

    run()
