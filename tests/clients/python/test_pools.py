"""Warm pools through the current official client (issue 8): a pool made over plain HTTP for a
snapshot and resources (a template naming the snapshot, then a pool of it; spec §2.8 with the
`ready`/`claimed`/`starting` counters of `GET /pools/{name}`), and the unchanged
`client.create_sandbox(snapshot_id=…)` with the same resources is served from it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import pytest
from conftest import CordonServer, unique_name

MIB = 1 << 20
VCPUS, MEM_BYTES = 1, 512 * MIB
POOL_SIZE = 5
BURST = 50
READY_TIMEOUT = 180
# Fails in a sandbox that someone already claimed.
CLAIM = "test ! -e /tmp/owner && echo {name} > /tmp/owner && cat /tmp/owner"


def api(server: CordonServer, method: str, path: str, body: Optional[dict] = None,
        timeout: float = 300) -> Any:
    """One direct HTTP call to the control plane, with the workspace's X-Api-Key."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{server.url}/api/v2/sandboxes{path}", data=data, method=method,
        headers={"X-Api-Key": server.api_key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {path} -> {e.code}: {e.read()[:2000]!r}") from None
    return json.loads(raw) if raw else None


def counts(server: CordonServer, pool: str) -> dict:
    body = api(server, "GET", f"/pools/{pool}")
    missing = [k for k in ("ready", "claimed", "starting") if not isinstance(body.get(k), int)]
    assert not missing, f"GET /pools/{pool} lacks the integer counters {missing}: {body}"
    return body


def wait_ready(server: CordonServer, pool: str, n: int, timeout: float = READY_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = counts(server, pool)
        if body["ready"] >= n:
            return body
        assert time.monotonic() < deadline, f"pool {pool} did not get {n} ready in {timeout}s: {body}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def default_snapshot_id(client) -> str:
    [snap] = [s for s in client.list_snapshots(name_contains="system/default") if s.name == "system/default"]
    return snap.id


@pytest.fixture
def warm_pool(cordon, default_snapshot_id) -> Iterator[str]:
    """A pool of POOL_SIZE warm sandboxes of the default snapshot with VCPUS and MEM_BYTES."""
    template, pool = unique_name("pool-tmpl"), unique_name("pool")
    api(cordon, "POST", "/templates", {
        "name": template, "image": default_snapshot_id,
        "resources": {"cpu": str(VCPUS), "memory": f"{MEM_BYTES // MIB}Mi"},
    })
    try:
        api(cordon, "POST", "/pools", {
            "name": pool, "template_name": template, "replicas": POOL_SIZE,
            "wait_for_ready": True, "timeout": READY_TIMEOUT,
        })
        try:
            yield pool
        finally:
            api(cordon, "DELETE", f"/pools/{pool}")
    finally:
        api(cordon, "DELETE", f"/templates/{template}")


def create(client, snapshot_id: str, **kwargs):
    return client.create_sandbox(
        snapshot_id=snapshot_id, vcpus=VCPUS, mem_bytes=MEM_BYTES,
        name=kwargs.pop("name", None) or unique_name("pooled"), timeout=READY_TIMEOUT, **kwargs,
    )


def test_create_from_snapshot_is_served_by_the_pool(cordon, client, warm_pool, default_snapshot_id):
    before = counts(cordon, warm_pool)
    assert before["ready"] == POOL_SIZE, before
    sb = create(client, default_snapshot_id)
    try:
        after = counts(cordon, warm_pool)
        assert after["claimed"] == before["claimed"] + 1, (before, after)
        assert sb.status == "ready"
        result = sb.run("echo pooled")
        assert (result.exit_code, result.stdout) == (0, "pooled\n")
        # A claimed sandbox is the client's own: fresh name and id, nothing of anyone else's.
        assert client.get_sandbox(sb.name).id == sb.id
    finally:
        client.delete_sandbox(sb.name)
    wait_ready(cordon, warm_pool, POOL_SIZE)


def test_other_resources_are_not_served_by_the_pool(cordon, client, warm_pool, default_snapshot_id):
    before = counts(cordon, warm_pool)
    sb = client.create_sandbox(
        snapshot_id=default_snapshot_id, vcpus=VCPUS, mem_bytes=2 * MEM_BYTES,
        name=unique_name("cold"), timeout=READY_TIMEOUT,
    )
    try:
        assert counts(cordon, warm_pool)["claimed"] == before["claimed"]
        assert sb.run("true").exit_code == 0
    finally:
        client.delete_sandbox(sb.name)


def test_burst_of_50_against_a_pool_of_5(cordon, client, warm_pool, default_snapshot_id):
    before = counts(cordon, warm_pool)
    names = [unique_name("burst") for _ in range(BURST)]
    boxes, errors = [], []

    def one(name):
        try:
            return create(client, default_snapshot_id, name=name)
        except Exception as e:  # noqa: BLE001 - counted and reported below
            errors.append(f"{name}: {e!r}")
            return None

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(BURST) as ex:
            boxes = [b for b in ex.map(one, names) if b is not None]
        elapsed = time.monotonic() - started
        assert not errors, f"{len(errors)} of {BURST} creates failed: {errors[:5]}"
        assert sorted(b.name for b in boxes) == sorted(names)
        assert len({b.id for b in boxes}) == BURST, "a sandbox was handed out twice"
        assert len({b.dataplane_url for b in boxes}) == BURST
        after = counts(cordon, warm_pool)
        assert after["claimed"] - before["claimed"] >= POOL_SIZE, (before, after)
        # Each sandbox is its own and clean: no earlier claimant's file in it.
        with ThreadPoolExecutor(10) as ex:
            owners = list(ex.map(lambda b: b.run(CLAIM.format(name=b.name)), boxes))
        assert [(r.exit_code, r.stdout) for r in owners] == [(0, f"{b.name}\n") for b in boxes]
        print(f"{BURST} creates against a pool of {POOL_SIZE}: {elapsed:.1f}s, {after}")
    finally:
        with ThreadPoolExecutor(10) as ex:
            list(ex.map(lambda b: client.delete_sandbox(b.name), boxes))
    # The pool refills.
    wait_ready(cordon, warm_pool, POOL_SIZE)
