"""Service URLs, download links and the JWKS through the official client (spec §5, §7).

A small stdlib web app (crates/cordon-server/tests/service_app.py: an HTML page, a header
recorder, a body echo and a WebSocket echo) runs inside a sandbox of the default snapshot.
`browser_url` is opened in headless Chromium (Debian's `chromium`) to prove the cookie flow.
`SandboxTokenVerifier` needs PyJWT (the client's `sandbox-auth` extra).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time

import httpx
import pytest
from conftest import REPO, unique_name

APP = (REPO / "crates/cordon-server/tests/service_app.py").read_text()
APP_PORT = 8000
TOKEN_HEADER = "X-Langsmith-Sandbox-Service-Token"


@pytest.fixture(scope="module")
def app_sandbox(client):
    """A sandbox running the web app on APP_PORT."""
    sb = client.create_sandbox(name=unique_name("compat-svc"), timeout=120)
    start_app(sb)
    yield sb
    try:
        client.delete_sandbox(sb.name)
    except Exception:  # noqa: BLE001 - already gone is fine
        pass


def start_app(sb) -> None:
    sb.write("/tmp/service_app.py", APP.encode())
    result = sb.run(
        f"setsid -f python3 /tmp/service_app.py {APP_PORT} >/tmp/app.log 2>&1 </dev/null; "
        f"for i in $(seq 100); do python3 -c 'import socket; "
        f'socket.create_connection(("127.0.0.1", {APP_PORT}))\' 2>/dev/null && exit 0; '
        "sleep 0.1; done; cat /tmp/app.log; exit 1",
        timeout=60,
    )
    assert result.exit_code == 0, result.stdout + result.stderr


def forged(token: str) -> str:
    """The token with its payload changed and its signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] += 3600
    raw = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{raw}.{signature}"


def test_service_helpers_proxy_http_and_strip_identity(app_sandbox):
    svc = app_sandbox.service(APP_PORT)
    assert svc.expires_at.endswith("Z")
    assert svc.service_url.rstrip("/").endswith(f"/svc/{app_sandbox.id}/{APP_PORT}")
    page = svc.get("/")
    assert page.status_code == 200
    assert "hello from the sandbox" in page.text

    seen = svc.get(
        "/headers",
        headers={"X-Langsmith-User-Id": "spoofed", "X-Langsmith-User-Email": "x@example.com", "X-Kept": "1"},
    ).json()
    names = {k.lower() for k in seen["headers"]}
    assert "x-kept" in names  # positive control: the app reports what it gets
    assert not names & {"x-langsmith-user-id", "x-langsmith-user-email", TOKEN_HEADER.lower(), "x-api-key"}

    body = bytes(range(256)) * 4096
    for send in (svc.post, svc.put):
        echoed = send("/echo", content=body, headers={"Content-Type": "application/x-test"})
        assert echoed.status_code == 200
        assert echoed.content == body


def test_refused_tokens(client, app_sandbox):
    svc = app_sandbox.service(APP_PORT)
    url = svc.service_url.rstrip("/") + "/headers"
    assert httpx.get(url).status_code == 401
    refused = httpx.get(url, headers={TOKEN_HEADER: forged(svc.token)})
    assert refused.status_code == 401
    assert refused.json()["detail"]["error"] == "Unauthorized"
    other_port = client.service(app_sandbox.name, APP_PORT + 1)
    assert httpx.get(url, headers={TOKEN_HEADER: other_port.token}).status_code == 403
    short = client.service(app_sandbox.name, APP_PORT, expires_in_seconds=1)
    token = short._token  # the property would refresh it: it is within 30 s of expiry
    time.sleep(2.1)
    assert httpx.get(url, headers={TOKEN_HEADER: token}).status_code == 401
    assert httpx.get(url, headers={TOKEN_HEADER: svc.token}).status_code == 200  # positive control
    with pytest.raises(Exception) as raised:
        client.service(unique_name("missing"), APP_PORT)
    assert type(raised.value).__name__ == "ResourceNotFoundError"


def test_token_refresh(app_sandbox):
    svc = app_sandbox.service(APP_PORT, expires_in_seconds=33)
    first = svc._token
    assert svc.token == first  # 33 s left: no refresh yet
    time.sleep(3.5)
    assert svc.token != first  # ≤ 30 s left: the client re-minted
    assert svc.get("/headers").status_code == 200


def test_websocket_echo(app_sandbox):
    from websockets.asyncio.client import connect

    svc = app_sandbox.service(APP_PORT)
    ws_url = svc.service_url.replace("http://", "ws://", 1).rstrip("/") + "/ws"

    async def echo():
        async with connect(ws_url, additional_headers={TOKEN_HEADER: svc.token}) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            blob = bytes(range(256)) * 400
            await ws.send(blob)
            assert await ws.recv() == blob

    asyncio.run(echo())

    async def refused():
        async with connect(ws_url):
            pass

    with pytest.raises(Exception) as raised:
        asyncio.run(refused())
    assert "401" in str(raised.value)


def test_token_verifies_with_sandbox_token_verifier(cordon, app_sandbox):
    pytest.importorskip("jwt", reason="SandboxTokenVerifier needs PyJWT (langsmith[sandbox-auth])")
    from langsmith.sandbox._verify import SandboxTokenVerificationError, SandboxTokenVerifier

    svc = app_sandbox.service(APP_PORT)
    token = svc.token
    audience = f"{APP_PORT}--{app_sandbox.id}"
    # The JWKS at the origin of LANGSMITH_ENDPOINT (loopback, so plain http is allowed).
    verifier = SandboxTokenVerifier(api_url=cordon.endpoint)
    user = verifier.verify_user_token(token, audience=audience)
    assert user.subject == app_sandbox.id
    verifier.verify_user_token(token, audience=audience, issuer=f"http://127.0.0.1:{cordon.port}")
    for bad, aud in ((forged(token), audience), (token, f"{APP_PORT + 1}--{app_sandbox.id}")):
        with pytest.raises(SandboxTokenVerificationError):
            verifier.verify_user_token(bad, audience=aud)


def test_download_links_get_head_range(client, app_sandbox):
    contents = b"<b>report</b> " + bytes(range(256)) * 100
    app_sandbox.write("/home/user/report.html", contents)
    link = app_sandbox.generate_download_url(
        "/home/user/report.html", expires_in_seconds=300, content_type="text/plain", content_disposition="attachment"
    )
    assert link.expires_at and link.expires_at.endswith("Z")
    got = httpx.get(link.download_url)
    assert got.status_code == 200
    assert got.content == contents
    assert got.headers["content-type"] == "text/plain"
    assert got.headers["content-disposition"].startswith('attachment; filename="report.html"')
    assert got.headers["content-security-policy"] == "sandbox"
    head = httpx.head(link.download_url)
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == len(contents)
    part = httpx.get(link.download_url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == contents[100:200]

    forever = client.generate_download_url(app_sandbox.name, "/home/user/report.html")
    assert forever.expires_at is None
    assert httpx.get(forever.download_url).content == contents
    tampered = forever.download_url[:-4] + ("AAAA" if not forever.download_url.endswith("AAAA") else "BBBB")
    assert httpx.get(tampered).status_code == 401
    with pytest.raises(ValueError):
        app_sandbox.generate_download_url("/home/user/report.html", expires_in_seconds=0)


def test_download_link_wakes_a_stopped_sandbox(client, make_sandbox):
    sb = make_sandbox()
    sb.write("/home/user/kept.txt", b"kept across a stop")
    link = sb.generate_download_url("/home/user/kept.txt")
    client.stop_sandbox(sb.name)
    deadline = time.monotonic() + 60
    while client.get_sandbox_status(sb.name).status != "stopped" and time.monotonic() < deadline:
        time.sleep(0.5)
    got = httpx.get(link.download_url, timeout=120)
    assert got.status_code == 200
    assert got.content == b"kept across a stop"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_browser_url_in_headless_chromium(app_sandbox):
    browser = chromium()
    if browser is None:
        pytest.fail("headless Chromium is needed: apt-get install chromium (make deps)")
    svc = app_sandbox.service(APP_PORT)

    def dump_dom(url: str) -> str:
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run(
                [
                    browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url,
                ],
                capture_output=True, text=True, timeout=120,
            )
        return proc.stdout + proc.stderr[-2000:]

    greeting = 'id="greeting">hello from the sandbox'
    # Positive control: without the token, a fresh browser gets no page.
    assert greeting not in dump_dom(svc.service_url)
    # The page is the app's: the cookie set by browser_url authenticated the redirected request.
    page = dump_dom(svc.browser_url)
    assert greeting in page, page
