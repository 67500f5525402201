"""Control plane through the official client: spec §2.2 (boxes), §1.1 (base URL), §1.3/§1.6 (auth,
errors), §2.5 (polling)."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from conftest import unique_name
from langsmith.sandbox import (
    ResourceNameConflictError,
    ResourceNotFoundError,
    Sandbox,
    SandboxAPIError,
    SandboxAuthenticationError,
    SandboxClient,
    SandboxClientError,
    SandboxConnectionError,
    ValidationError,
)

ISO_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def http_status(exc: BaseException):
    """The HTTP status behind a client exception (the client chains the httpx error)."""
    response = getattr(exc.__cause__, "response", None)  # httpx or httpx2 HTTPStatusError
    return getattr(response, "status_code", None)


def assert_uuid(value):
    assert isinstance(value, str), value
    assert str(uuid.UUID(value)) == value.lower(), value


def assert_dataplane_url(cordon, sb):
    url = sb.dataplane_url
    assert url, f"sandbox {sb.name} has no dataplane_url"
    assert url.startswith(cordon.url + "/"), url
    assert url.endswith(f"/dp/{sb.id}"), url
    assert not url.endswith("/") and "?" not in url, url


# ---------------------------------------------------------------------------- create/get/list/delete


def test_create_get_list_delete(client, cordon):
    name = unique_name()
    sb = client.create_sandbox(name=name, timeout=120)
    try:
        assert isinstance(sb, Sandbox)
        assert sb.name == name
        assert_uuid(sb.id)
        assert sb.status == "ready"
        assert_dataplane_url(cordon, sb)
        assert sb.created_at and ISO_8601.match(sb.created_at), sb.created_at
        # The sandbox works right away.
        assert sb.run("echo created").stdout == "created\n"

        got = client.get_sandbox(name)
        assert (got.name, got.id, got.status, got.dataplane_url) == (name, sb.id, "ready", sb.dataplane_url)
        # Box paths accept the UUID as well as the name (§2.1.1, §2.2.5).
        by_id = client.get_sandbox(sb.id)
        assert (by_id.name, by_id.id) == (name, sb.id)

        listed = {s.name: s for s in client.list_sandboxes()}
        assert name in listed, sorted(listed)
        assert listed[name].id == sb.id
        assert listed[name].dataplane_url == sb.dataplane_url
    finally:
        client.delete_sandbox(sb.id)  # DELETE accepts the UUID too (§2.2.5)

    with pytest.raises(ResourceNotFoundError) as e:
        client.get_sandbox(name)
    assert e.value.resource_type == "sandbox"
    assert http_status(e.value) == 404
    assert name not in {s.name for s in client.list_sandboxes()}
    with pytest.raises(ResourceNotFoundError):
        client.delete_sandbox(name)


def test_generated_name_and_defaults(client, make_sandbox):
    sb = make_sandbox(name=None)
    assert sb.name, "the server must generate a name when none is given"
    assert client.get_sandbox(sb.name).id == sb.id
    # Spec §2.2.1 defaults: idle_ttl_seconds 600, persistent true (not exposed by the client).
    assert sb.idle_ttl_seconds == 600


def test_create_echoes_settings(make_sandbox):
    sb = make_sandbox(idle_ttl_seconds=1200, delete_after_stop_seconds=3600)
    assert sb.idle_ttl_seconds == 1200
    assert sb.delete_after_stop_seconds == 3600


def test_context_manager_deletes(client):
    with client.sandbox(timeout=120) as sb:
        name = sb.name
        assert sb.status == "ready"
        result = sb.run("echo inside")
        assert (result.stdout, result.exit_code) == ("inside\n", 0)
        assert name in {s.name for s in client.list_sandboxes()}
    with pytest.raises(ResourceNotFoundError):
        client.get_sandbox(name)


def test_duplicate_name_is_rejected(client, make_sandbox):
    sb = make_sandbox()
    with pytest.raises(SandboxClientError) as e:
        client.create_sandbox(name=sb.name, timeout=120)
    # §2.2.1: 409 is not specially mapped on create -> generic SandboxClientError.
    assert http_status(e.value) == 409
    assert [s.id for s in client.list_sandboxes() if s.name == sb.name] == [sb.id]


# ---------------------------------------------------------------------------- status, stop, start


def test_status_polling_after_create_without_wait(client, make_sandbox, cordon):
    sb = make_sandbox(wait_for_ready=False)
    # §2.2.1: with wait_for_ready=false the answer comes before the sandbox is ready.
    assert sb.status in ("provisioning", "ready"), sb.status
    status = client.get_sandbox_status(sb.name)
    assert status.status in ("provisioning", "ready"), status
    ready = client.wait_for_sandbox(sb.name, timeout=120)
    assert ready.status == "ready"
    assert ready.id == sb.id
    assert_dataplane_url(cordon, ready)
    final = client.get_sandbox_status(sb.name)
    assert final.status == "ready"
    assert final.status_message is None
    assert ready.run("echo polled").stdout == "polled\n"


def test_status_of_missing_sandbox(client):
    with pytest.raises(ResourceNotFoundError):
        client.get_sandbox_status(unique_name("missing"))


def wait_for_status(client, name, wanted, timeout=60):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        status = client.get_sandbox_status(name).status
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == wanted:
            return seen
        assert time.monotonic() < deadline, f"{name}: never reached {wanted!r}; saw {seen}"
        time.sleep(0.2)


def test_stop_start_keeps_files(client, make_sandbox):
    sb = make_sandbox()
    sb.write("/home/user/keep/data.txt", "survives a stop\n")
    sb.run("mkdir -p /home/user/keep/d && echo from-exec > /home/user/keep/d/x")
    assert sb.run("cat /home/user/keep/d/x").stdout == "from-exec\n"

    started = time.monotonic()
    client.stop_sandbox(sb.name)
    assert time.monotonic() - started < 10, "stop must answer within the client's 10 s timeout"
    wait_for_status(client, sb.name, "stopped")
    stopped = client.get_sandbox(sb.name)
    assert stopped.status == "stopped"
    assert stopped.stopped_at and ISO_8601.match(stopped.stopped_at), stopped.stopped_at
    assert stopped.dataplane_url == sb.dataplane_url, "dataplane_url must be stable across stop/start"

    restarted = client.start_sandbox(sb.name, timeout=120)
    assert restarted.status == "ready"
    assert restarted.stopped_at is None
    assert restarted.dataplane_url == sb.dataplane_url
    assert restarted.read("/home/user/keep/data.txt") == b"survives a stop\n"
    assert restarted.run("cat /home/user/keep/d/x").stdout == "from-exec\n"


def test_sandbox_object_stop_and_start(client, make_sandbox):
    sb = make_sandbox()
    sb.write("/home/user/obj.txt", "obj")
    sb.stop()
    wait_for_status(client, sb.name, "stopped")
    sb.start(timeout=120)
    assert client.get_sandbox_status(sb.name).status == "ready"
    assert sb.read("/home/user/obj.txt") == b"obj"


def test_dataplane_request_resumes_stopped_sandbox(client, make_sandbox):
    """§2.2.8 / §3.1 SHOULD: a data-plane request to a stopped sandbox starts it again."""
    sb = make_sandbox()
    sb.write("/home/user/resume.txt", "resumed")
    client.stop_sandbox(sb.name)
    wait_for_status(client, sb.name, "stopped")
    assert sb.read("/home/user/resume.txt") == b"resumed"
    assert sb.run("cat /home/user/resume.txt").stdout == "resumed"
    assert client.get_sandbox_status(sb.name).status == "ready"


def test_start_missing_and_stop_missing(client):
    with pytest.raises(ResourceNotFoundError):
        client.stop_sandbox(unique_name("missing"))
    with pytest.raises(ResourceNotFoundError):
        client.start_sandbox(unique_name("missing"), timeout=5)


# ---------------------------------------------------------------------------- update


def test_update_rename(client, make_sandbox):
    sb = make_sandbox()
    old = sb.name
    new = unique_name("renamed")
    updated = client.update_sandbox(old, new_name=new)
    assert updated.name == new
    assert updated.id == sb.id, "the id is constant across renames"
    assert updated.dataplane_url == sb.dataplane_url
    with pytest.raises(ResourceNotFoundError):
        client.get_sandbox(old)
    got = client.get_sandbox(new)
    assert got.id == sb.id
    names = {s.name for s in client.list_sandboxes()}
    assert new in names and old not in names
    assert got.run("echo still-here").stdout == "still-here\n"
    client.delete_sandbox(new)


def test_update_ttls_and_empty_patch(client, make_sandbox):
    sb = make_sandbox()
    updated = client.update_sandbox(sb.name, idle_ttl_seconds=0, delete_after_stop_seconds=120)
    assert (updated.idle_ttl_seconds, updated.delete_after_stop_seconds) == (0, 120)
    again = client.get_sandbox(sb.name)
    assert (again.idle_ttl_seconds, again.delete_after_stop_seconds) == (0, 120)
    # Python sends PATCH {} when nothing is set (§2.2.4): a no-op answered with the sandbox.
    same = client.update_sandbox(sb.name)
    assert (same.name, same.id, same.idle_ttl_seconds) == (sb.name, sb.id, 0)


def test_update_run_config_applies_to_later_commands(client, make_sandbox):
    sb = make_sandbox()
    client.update_sandbox(sb.name, run_config={"env_vars": {"COMPAT_VAR": "patched"}, "work_dir": "/tmp"})
    result = sb.run('echo "$COMPAT_VAR"; pwd')
    assert result.stdout == "patched\n/tmp\n"


def test_rename_conflict(client, make_sandbox):
    a = make_sandbox()
    b = make_sandbox()
    with pytest.raises(ResourceNameConflictError) as e:
        client.update_sandbox(a.name, new_name=b.name)
    assert http_status(e.value) == 409
    assert client.get_sandbox(a.name).id == a.id
    assert client.get_sandbox(b.name).id == b.id


def test_update_missing(client):
    with pytest.raises(ResourceNotFoundError):
        client.update_sandbox(unique_name("missing"), new_name=unique_name())


# ---------------------------------------------------------------------------- base URL forms (§1.1)


@pytest.mark.parametrize("suffix", ["", "/api", "/api/v1", "/api/"])
def test_endpoint_forms(cordon, client, shared_sandbox, monkeypatch, suffix):
    monkeypatch.setenv("LANGSMITH_ENDPOINT", cordon.url + suffix)
    with SandboxClient() as c:
        assert shared_sandbox.name in {s.name for s in c.list_sandboxes()}


@pytest.mark.parametrize("base", ["/v2/sandboxes", "/api/v2/sandboxes"])
def test_explicit_api_endpoint(cordon, shared_sandbox, base):
    """Old clients and the docstrings use `.../v2/sandboxes` without `/api` (§1.1 MUST)."""
    with SandboxClient(api_endpoint=cordon.url + base, api_key=cordon.api_key) as c:
        got = c.get_sandbox(shared_sandbox.name)
        assert got.id == shared_sandbox.id


def test_wrong_base_url_is_reported(cordon):
    with SandboxClient(api_endpoint=cordon.url + "/nope/v2/sandboxes", api_key=cordon.api_key) as c:
        with pytest.raises(SandboxAPIError) as e:
            c.list_sandboxes()
        assert http_status(e.value) == 404


# ---------------------------------------------------------------------------- auth and workspaces


def test_wrong_api_key(cordon, shared_sandbox):
    with SandboxClient(api_key="ck-wrong-" + uuid.uuid4().hex, max_retries=0) as bad:
        with pytest.raises(SandboxAuthenticationError) as e:
            bad.list_sandboxes()
        assert http_status(e.value) in (401, 403)
        with pytest.raises(SandboxAuthenticationError):
            bad.get_sandbox(shared_sandbox.name)
        with pytest.raises(SandboxAuthenticationError):
            bad.create_sandbox(name=unique_name(), timeout=30)
        with pytest.raises(SandboxAuthenticationError):
            bad.delete_sandbox(shared_sandbox.name)
    # The sandbox is untouched.
    assert shared_sandbox.run("echo ok").stdout == "ok\n"


def test_missing_api_key(cordon, monkeypatch):
    monkeypatch.delenv("LANGSMITH_API_KEY")
    with SandboxClient(max_retries=0) as anon:
        assert anon._api_key is None
        with pytest.raises(SandboxAuthenticationError) as e:
            anon.list_sandboxes()
        assert http_status(e.value) in (401, 403)


def test_wrong_api_key_on_data_plane(cordon, shared_sandbox):
    """The data plane is authenticated with the same key (§1.3)."""
    shared_sandbox.write("/tmp/secret-for-auth-test", "secret")
    with SandboxClient(api_key="ck-wrong-" + uuid.uuid4().hex, max_retries=0) as bad:
        stolen = Sandbox.from_dict(
            {"name": shared_sandbox.name, "id": shared_sandbox.id, "dataplane_url": shared_sandbox.dataplane_url},
            client=bad, auto_delete=False,
        )
        with pytest.raises(SandboxClientError) as e:
            stolen.read("/tmp/secret-for-auth-test")
        assert http_status(e.value) in (401, 403)
        with pytest.raises(SandboxClientError) as e:
            stolen.write("/tmp/planted", "x")
        assert http_status(e.value) in (401, 403)
        # WebSocket upgrade refused with 401/403 -> SandboxConnectionError, not retried (§3.3.1).
        with pytest.raises(SandboxConnectionError):
            stolen.run("touch /tmp/planted-by-exec", timeout=10)
    check = shared_sandbox.run("ls /tmp/planted /tmp/planted-by-exec 2>&1; true").stdout
    assert "No such file" in check and check.count("No such file") == 2, check


def test_other_workspace_sees_404(cordon, client, other_client, make_sandbox):
    mine = make_sandbox()
    with pytest.raises(ResourceNotFoundError) as e:
        other_client.get_sandbox(mine.name)
    assert http_status(e.value) == 404
    with pytest.raises(ResourceNotFoundError):
        other_client.get_sandbox(mine.id)
    with pytest.raises(ResourceNotFoundError):
        other_client.get_sandbox_status(mine.name)
    with pytest.raises(ResourceNotFoundError):
        other_client.update_sandbox(mine.name, new_name=unique_name())
    with pytest.raises(ResourceNotFoundError):
        other_client.stop_sandbox(mine.name)
    with pytest.raises(ResourceNotFoundError):
        other_client.delete_sandbox(mine.name)
    assert mine.name not in {s.name for s in other_client.list_sandboxes()}
    # Still there and untouched for its owner.
    assert client.get_sandbox(mine.name).status == "ready"


def test_other_workspace_cannot_use_data_plane(cordon, other_client, make_sandbox):
    mine = make_sandbox()
    mine.write("/tmp/ws1.txt", "workspace one")
    foreign = Sandbox.from_dict(
        {"name": mine.name, "id": mine.id, "dataplane_url": mine.dataplane_url},
        client=other_client, auto_delete=False,
    )
    with pytest.raises(SandboxClientError) as e:
        foreign.read("/tmp/ws1.txt")
    assert http_status(e.value) in (403, 404)
    with pytest.raises(SandboxClientError):
        foreign.write("/tmp/ws2-was-here", "x")
    with pytest.raises(SandboxConnectionError):
        foreign.run("touch /tmp/ws2-exec", timeout=10)
    check = mine.run("ls /tmp/ws2-was-here /tmp/ws2-exec 2>&1; true").stdout
    assert check.count("No such file") == 2, check


def test_same_name_in_two_workspaces(client, other_client, make_sandbox):
    """Names are unique per workspace (§2.1.1), so each workspace may use the same one."""
    mine = make_sandbox()
    theirs = make_sandbox(other_client, name=mine.name)
    assert theirs.name == mine.name and theirs.id != mine.id
    assert client.get_sandbox(mine.name).id == mine.id
    assert other_client.get_sandbox(mine.name).id == theirs.id
    mine.write("/tmp/who", "one")
    theirs.write("/tmp/who", "two")
    assert mine.read("/tmp/who") == b"one"
    assert theirs.read("/tmp/who") == b"two"


# ---------------------------------------------------------------------------- validation (§1.6 B)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vcpus": -1}, "vcpus"),
        ({"mem_bytes": -1}, "mem_bytes"),
        ({"fs_capacity_bytes": -1}, "fs_capacity_bytes"),
        # pydantic would say loc [body, run_config, work_dir]; the spec only fixes the 422 shape.
        ({"run_config": {"work_dir": "relative/dir"}}, ("work_dir", "run_config")),
    ],
)
def test_invalid_create_fields(client, kwargs, field):
    name = unique_name("invalid")
    with pytest.raises(ValidationError) as e:
        client.create_sandbox(name=name, timeout=30, **kwargs)
    assert http_status(e.value) == 422
    assert e.value.field in ((field,) if isinstance(field, str) else field), (e.value.field, e.value.details)
    assert name not in {s.name for s in client.list_sandboxes()}


def test_invalid_update_field(client, make_sandbox):
    sb = make_sandbox()
    with pytest.raises(ValidationError) as e:
        client.update_sandbox(sb.name, run_config={"work_dir": "not/absolute"})
    assert http_status(e.value) == 422
    assert sb.run("pwd").stdout == "/home/user\n", "a rejected update must change nothing"


def test_unknown_snapshot(client):
    name = unique_name("nosnap")
    with pytest.raises(SandboxClientError) as e:
        client.create_sandbox(name=name, snapshot="no-such-snapshot:latest", timeout=30)
    assert http_status(e.value) in (404, 422)
    assert name not in {s.name for s in client.list_sandboxes()}
