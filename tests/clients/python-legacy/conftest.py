"""Fixtures for the legacy (template-era) official-client suite: langsmith 0.6.x, spec §2.8.

The server fixtures (`cordon`, `own_server`, log sections, the terminal summary) are those of
../python/conftest.py, loaded from there rather than copied. What differs: the 0.6.x
`SandboxClient` takes no `max_retries` and knows templates and pools, so the end-of-session
cleanup is this file's (pools first: their warm sandboxes outlive `cordon serve` too), and the
`client` fixtures are the legacy client's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

_SHARED = Path(__file__).resolve().parent.parent / "python" / "conftest.py"
_spec = importlib.util.spec_from_file_location("cordon_clients_shared_conftest", _SHARED)
shared = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = shared
_spec.loader.exec_module(shared)

# Re-exported so pytest registers them from this conftest (fixtures and hooks alike).
from cordon_clients_shared_conftest import (  # noqa: E402,F401
    CordonServer,
    _registries_or_error,
    _server_stays_up,
    cordon,
    own_server,
    pytest_runtest_makereport,
    pytest_terminal_summary,
)


def _cleanup_legacy(server: CordonServer) -> list[str]:
    """Deletes every pool, sandbox and template left in both workspaces (in that order: a pool
    holds warm sandboxes and its template)."""
    from langsmith.sandbox import SandboxClient

    notes = []
    for key in (server.api_key, server.other_api_key):
        with SandboxClient(api_endpoint=f"{server.url}/api/v2/sandboxes", api_key=key) as c:
            for kind, lister, deleter in (
                ("pool", c.list_pools, c.delete_pool),
                ("sandbox", c.list_sandboxes, c.delete_sandbox),
                ("template", c.list_templates, c.delete_template),
            ):
                try:
                    for item in lister():
                        try:
                            deleter(item.name)
                            notes.append(f"deleted leftover {kind} {item.name!r}")
                        except Exception as e:  # noqa: BLE001 - best effort, reported
                            notes.append(f"could not delete leftover {kind} {item.name!r}: {e!r}")
                except Exception as e:  # noqa: BLE001
                    notes.append(f"could not list {kind}s for cleanup: {e!r}")
    return notes


# The shared `cordon` fixture calls its module's `_cleanup_sandboxes` at the end of the session.
shared._cleanup_sandboxes = _cleanup_legacy


def unique_name(prefix: str = "legacy") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def client(cordon: CordonServer):
    """The legacy client, configured only through the environment, as a user's would be."""
    from langsmith.sandbox import SandboxClient

    c = SandboxClient()
    yield c
    c.close()


@pytest.fixture(scope="session")
def other_client(cordon: CordonServer):
    """A legacy client of the second workspace (the server's second --api-key)."""
    from langsmith.sandbox import SandboxClient

    c = SandboxClient(api_key=cordon.other_api_key)
    yield c
    c.close()


@pytest.fixture(scope="session")
def default_image(cordon: CordonServer) -> str:
    """A template `image` naming the default snapshot, as GET /snapshots lists it."""
    listed = api(cordon, "GET", "/snapshots?name_contains=system/default")
    names = {s.get("name") for s in listed["snapshots"]}
    assert "system/default" in names, f"GET /snapshots does not list system/default: {listed}"
    return "system/default"


@pytest.fixture
def cleanup(client) -> Iterator[list]:
    """Undo list for one test: (kind, name) pairs deleted after it, pools before templates."""
    created: list = []
    yield created
    order = {"pool": 0, "sandbox": 1, "template": 2}
    for kind, name in sorted(created, key=lambda kn: order[kn[0]]):
        try:
            getattr(client, f"delete_{kind}")(name)
        except Exception:  # noqa: BLE001 - already gone is fine; leftovers are swept at the end
            pass


def api(server: CordonServer, method: str, path: str, body: Optional[dict] = None,
        key: Optional[str] = None, timeout: float = 180) -> Any:
    """One direct HTTP call to the control plane (for what the legacy client does not show,
    such as a pool's ready/claimed/starting counts)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{server.url}/api/v2/sandboxes{path}", data=data, method=method,
        headers={"X-Api-Key": key or server.api_key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {path} -> {e.code}: {e.read()[:2000]!r}") from None
    return json.loads(raw) if raw else None
