"""Templates, pools and boxes from a template through the legacy official client (langsmith
0.6.x, spec §2.8): its own calls, its own error mapping, its HTTP-only data plane."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from langsmith.sandbox import (
    Pool,
    ResourceAlreadyExistsError,
    ResourceInUseError,
    ResourceNameConflictError,
    ResourceNotFoundError,
    Sandbox,
    SandboxClientError,
    SandboxTemplate,
)

from conftest import api, unique_name

READY_TIMEOUT = 120


def make_template(client, cleanup, image, **resources) -> SandboxTemplate:
    name = unique_name("tmpl")
    resources.setdefault("cpu", "500m")
    resources.setdefault("memory", "256Mi")
    template = client.create_template(name, image, **resources)
    cleanup.append(("template", name))
    return template


def make_pool(client, cleanup, template_name, replicas) -> Pool:
    name = unique_name("pool")
    pool = client.create_pool(name, template_name, replicas, timeout=READY_TIMEOUT)
    cleanup.append(("pool", name))
    return pool


def pool_counts(cordon, name, key=None) -> dict:
    """The extension counters of `GET /pools/{name}`: ready, claimed, starting."""
    body = api(cordon, "GET", f"/pools/{name}", key=key)
    missing = [k for k in ("ready", "claimed", "starting") if not isinstance(body.get(k), int)]
    assert not missing, f"GET /pools/{name} lacks the integer counters {missing}: {body}"
    return body


def wait_pool(cordon, name, predicate, timeout=READY_TIMEOUT, key=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = pool_counts(cordon, name, key)
        if predicate(body):
            return body
        assert time.monotonic() < deadline, f"pool {name} never reached the wanted state: {body}"
        time.sleep(0.25)


def test_template_crud(client, cleanup, default_image):
    t = make_template(client, cleanup, default_image, cpu="1", memory="512Mi")
    assert isinstance(t, SandboxTemplate)
    assert t.image == default_image
    assert (t.resources.cpu, t.resources.memory) == ("1", "512Mi")
    assert t.volume_mounts == []
    assert t.id and t.created_at and t.updated_at

    got = client.get_template(t.name)
    assert (got.id, got.name, got.image) == (t.id, t.name, t.image)
    assert (got.resources.cpu, got.resources.memory) == ("1", "512Mi")
    assert t.id in {x.id for x in client.list_templates()}

    new_name = unique_name("tmpl-renamed")
    renamed = client.update_template(t.name, new_name=new_name)
    cleanup.append(("template", new_name))
    assert (renamed.id, renamed.name) == (t.id, new_name)
    with pytest.raises(ResourceNotFoundError) as e:
        client.get_template(t.name)
    assert e.value.resource_type == "template"
    assert client.get_template(new_name).id == t.id

    other = make_template(client, cleanup, default_image)
    with pytest.raises(ResourceNameConflictError):
        client.update_template(other.name, new_name=new_name)
    with pytest.raises(SandboxClientError):  # 409 on create is mapped generically
        client.create_template(new_name, default_image)

    client.delete_template(new_name)
    with pytest.raises(ResourceNotFoundError):
        client.get_template(new_name)
    with pytest.raises(ResourceNotFoundError):
        client.delete_template(new_name)
    assert t.id not in {x.id for x in client.list_templates()}


def test_template_storage_and_bad_resources(client, cleanup, default_image):
    t = make_template(client, cleanup, default_image, storage="1Gi")
    assert client.get_template(t.name).resources.storage == "1Gi"
    name = unique_name("tmpl-bad")
    with pytest.raises(SandboxClientError):
        client.create_template(name, default_image, cpu="lots")
    with pytest.raises(ResourceNotFoundError):
        client.get_template(name)


def test_box_from_template_runs_over_http_execute(client, cleanup, default_image):
    t = make_template(client, cleanup, default_image)
    name = unique_name("box")
    sb = client.create_sandbox(t.name, name=name, timeout=READY_TIMEOUT)
    cleanup.append(("sandbox", name))
    assert isinstance(sb, Sandbox)
    assert sb.name == name
    assert sb.template_name == t.name
    assert sb.dataplane_url and sb.id
    result = sb.run("echo hello from $(hostname)")
    assert result.exit_code == 0, result
    assert result.stdout.startswith("hello from ")
    sb.write("/tmp/legacy.txt", b"payload")
    assert sb.read("/tmp/legacy.txt") == b"payload"
    assert client.get_sandbox(name).template_name == t.name
    client.delete_sandbox(name)
    with pytest.raises(ResourceNotFoundError):
        client.get_sandbox(name)


def test_sandbox_context_manager_deletes(client, cleanup, default_image):
    t = make_template(client, cleanup, default_image)
    with client.sandbox(t.name, timeout=READY_TIMEOUT) as sb:
        cleanup.append(("sandbox", sb.name))
        assert sb.run("true").exit_code == 0
    with pytest.raises(ResourceNotFoundError):
        client.get_sandbox(sb.name)


def test_pool_serves_boxes_and_refills(client, cleanup, cordon, default_image):
    t = make_template(client, cleanup, default_image)
    pool = make_pool(client, cleanup, t.name, 2)
    assert isinstance(pool, Pool)
    assert (pool.template_name, pool.replicas) == (t.name, 2)
    assert pool.id and pool.created_at
    assert client.get_pool(pool.name).id == pool.id
    assert pool.id in {p.id for p in client.list_pools()}
    # wait_for_ready: the create answered once the replicas were warm.
    before = pool_counts(cordon, pool.name)
    assert before["ready"] == 2, before

    name = unique_name("pooled")
    started = time.monotonic()
    sb = client.create_sandbox(t.name, name=name, timeout=READY_TIMEOUT)
    claim_s = time.monotonic() - started
    cleanup.append(("sandbox", name))
    after = pool_counts(cordon, pool.name)
    assert after["claimed"] == before["claimed"] + 1, (before, after)
    assert sb.template_name == t.name and sb.name == name
    result = sb.run("test ! -e /tmp/owner && echo ok")
    assert result.exit_code == 0 and result.stdout.endswith("ok\n"), result
    # The pool refills in the background.
    wait_pool(cordon, pool.name, lambda b: b["ready"] == 2)
    client.delete_sandbox(name)
    print(f"box from a warm pool answered in {claim_s * 1000:.0f} ms")


def test_pool_update_and_delete(client, cleanup, cordon, default_image):
    t = make_template(client, cleanup, default_image)
    pool = make_pool(client, cleanup, t.name, 1)
    grown = client.update_pool(pool.name, replicas=2)
    assert (grown.id, grown.replicas) == (pool.id, 2)
    wait_pool(cordon, pool.name, lambda b: b["ready"] == 2)
    new_name = unique_name("pool-renamed")
    renamed = client.update_pool(pool.name, new_name=new_name, replicas=0)
    cleanup.append(("pool", new_name))
    assert (renamed.id, renamed.name, renamed.replicas) == (pool.id, new_name, 0)
    wait_pool(cordon, new_name, lambda b: b["ready"] == 0 and b["starting"] == 0)
    with pytest.raises(ResourceNotFoundError):
        client.get_pool(pool.name)
    client.delete_pool(new_name)
    with pytest.raises(ResourceNotFoundError) as e:
        client.get_pool(new_name)
    assert e.value.resource_type == "pool"
    with pytest.raises(ResourceNotFoundError):
        client.delete_pool(new_name)
    # The pool was its template's only user.
    client.delete_template(t.name)


def test_errors(client, cleanup, default_image):
    with pytest.raises(ResourceNotFoundError) as e:
        client.create_pool(unique_name("pool"), unique_name("missing"), 1, timeout=30)
    assert e.value.resource_type == "template"
    with pytest.raises(ResourceNotFoundError):
        client.create_sandbox(unique_name("missing"), timeout=30)

    t = make_template(client, cleanup, default_image)
    pool = make_pool(client, cleanup, t.name, 1)
    with pytest.raises(ResourceAlreadyExistsError) as e:
        client.create_pool(pool.name, t.name, 1, timeout=30)
    assert e.value.resource_type == "pool"
    assert client.get_pool(pool.name).replicas == 1, "the failed create changed the pool"

    with pytest.raises(ResourceInUseError) as e:
        client.delete_template(t.name)
    assert e.value.resource_type == "template"
    assert client.get_template(t.name).id == t.id, "the refused delete removed the template"


def test_template_in_use_by_a_sandbox(client, cleanup, default_image):
    t = make_template(client, cleanup, default_image)
    name = unique_name("box")
    client.create_sandbox(t.name, name=name, timeout=READY_TIMEOUT)
    cleanup.append(("sandbox", name))
    with pytest.raises(ResourceInUseError):
        client.delete_template(t.name)
    client.delete_sandbox(name)
    client.delete_template(t.name)


def test_concurrent_creates_from_a_pool_are_distinct(client, cleanup, cordon, default_image):
    t = make_template(client, cleanup, default_image)
    pool = make_pool(client, cleanup, t.name, 3)
    names = [unique_name("burst") for _ in range(6)]
    cleanup.extend(("sandbox", n) for n in names)
    with ThreadPoolExecutor(len(names)) as ex:
        boxes = list(ex.map(lambda n: client.create_sandbox(t.name, name=n, timeout=READY_TIMEOUT), names))
    assert len({b.id for b in boxes}) == len(names)
    assert len({b.dataplane_url for b in boxes}) == len(names)
    # Each sandbox is its own and clean: no earlier claimant's file in it.
    claim = "test ! -e /tmp/owner && echo {} > /tmp/owner && cat /tmp/owner"
    owners = [b.run(claim.format(b.name)) for b in boxes]
    assert [(r.exit_code, r.stdout) for r in owners] == [(0, f"{b.name}\n") for b in boxes]
    wait_pool(cordon, pool.name, lambda b: b["ready"] == 3)


def test_workspaces_stay_apart(client, other_client, cleanup, cordon, default_image):
    t = make_template(client, cleanup, default_image)
    pool = make_pool(client, cleanup, t.name, 1)
    with pytest.raises(ResourceNotFoundError):
        other_client.get_template(t.name)
    with pytest.raises(ResourceNotFoundError):
        other_client.get_pool(pool.name)
    assert t.name not in {x.name for x in other_client.list_templates()}
    assert pool.name not in {p.name for p in other_client.list_pools()}
    with pytest.raises(ResourceNotFoundError):
        other_client.create_sandbox(t.name, timeout=30)
    with pytest.raises(ResourceNotFoundError):
        other_client.delete_template(t.name)
    assert client.get_template(t.name).id == t.id
