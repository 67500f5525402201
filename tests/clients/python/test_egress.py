"""Egress through the official client (spec §6.1): a sandbox created with `proxy_config` built
by the client's own helpers reaches an HTTPS upstream on loopback through Cordon's proxy; the
upstream receives the rule's header (an opaque secret) and the sandbox never sees the secret.

The test runs its own `cordon serve` with `--allow-egress-cidr 127.0.0.0/8`,
`--egress-any-port` and `--egress-ca` (the upstream's test CA, made with `openssl`).
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import CordonServer, unique_name

SECRET = "pyClientOpaqueSecret-91c2e7"
# The upstream's name: the test DNS server answers 127.0.0.1 for it (`localhost` itself is
# refused in rules: it names the proxy's own machine).
HOST = "upstream.egress.test"
# Matches SECRET without containing it (the search's own command line is readable in /proc).
SECRET_PATTERN = "pyClientOpaqueSecre[t]-91c2e7"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class _Dns:
    """A minimal UDP DNS server on 127.0.0.1: every A query gets 127.0.0.1, others no answer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            if len(query) < 12:
                continue
            end = 12
            while end < len(query) and query[end] != 0:
                end += query[end] + 1
            question = query[12:end + 5]
            qtype = struct.unpack("!H", query[end + 1:end + 3])[0] if end + 3 <= len(query) else 0
            answers = 1 if qtype == 1 else 0
            header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, answers, 0, 0)
            reply = header + question
            if answers:
                reply += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton("127.0.0.1")
            self.sock.sendto(reply, peer)

    def close(self) -> None:
        self.sock.close()


class _Upstream:
    """HTTPS on 127.0.0.1 with a leaf for HOST signed by its own CA; records headers."""

    def __init__(self, tmp: Path) -> None:
        ca_key, ca, key, csr, cert, ext = (tmp / n for n in ("ca.key", "ca.pem", "key.pem", "leaf.csr", "cert.pem", "ext.cnf"))
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
                 "-keyout", str(ca_key), "-out", str(ca))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST}",
                 "-keyout", str(key), "-out", str(csr))
        ext.write_text(f"subjectAltName=DNS:{HOST}\nbasicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-days", "1", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-extfile", str(ext), "-out", str(cert))
        self.ca = ca
        self.requests: list[dict[str, str]] = []
        recorded = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                recorded.append({k.lower(): v for k, v in self.headers.items()} | {":path": self.path})
                body = b"upstream ok\n"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def egress_server(request, cordon: CordonServer):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed for the upstream's test CA")
    tmp = Path(tempfile.mkdtemp(prefix="cordon-egress-"))
    upstream = _Upstream(tmp)
    dns = _Dns()
    server = CordonServer([
        *cordon.extra_args,
        "--allow-egress-cidr", "127.0.0.0/8",
        "--egress-resolver", dns.addr,
        "--egress-any-port",
        "--egress-ca", str(upstream.ca),
    ])
    request.node._cordon_own_server = server
    try:
        server.start(float(os.environ.get("CORDON_START_TIMEOUT", "180")))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server, upstream
    server.stop()
    upstream.close()
    dns.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("CORDON_KEEP_DATA") != "1":
        shutil.rmtree(server.data_dir, ignore_errors=True)
        if not getattr(request.node, "_cordon_failed", False):
            server.log_path.unlink(missing_ok=True)


def test_a_proxy_rule_reaches_the_upstream_and_not_the_sandbox(egress_server):
    sandbox_module = pytest.importorskip("langsmith.sandbox")
    if not hasattr(sandbox_module, "proxy_config") or not hasattr(sandbox_module, "opaque_secret"):
        pytest.skip("this langsmith version has no proxy_config helpers")
    from langsmith.sandbox import SandboxClient, opaque_secret, proxy_config

    server, upstream = egress_server
    config = proxy_config(rules=[{
        "name": "upstream-token",
        "match_hosts": [HOST],
        "headers": [{"name": "x-upstream-token", **opaque_secret(SECRET)}],
        "env_vars": {"UPSTREAM_TOKEN_HINT": "dummy"},
    }])
    with SandboxClient(api_endpoint=f"{server.url}/api/v2/sandboxes", api_key=server.api_key) as client:
        sb = client.create_sandbox(name=unique_name("egress"), proxy_config=config, timeout=120)
        try:
            fetched = client.get_sandbox(sb.name)
            for shown in (repr(sb), repr(fetched)):
                assert SECRET not in shown

            result = sb.run(f"curl -sS --max-time 20 https://{HOST}:{upstream.port}/hello", timeout=60)
            assert result.stdout == "upstream ok\n", result.stderr
            assert upstream.requests[-1][":path"] == "/hello"
            assert upstream.requests[-1]["x-upstream-token"] == SECRET

            env = sb.run("env", timeout=60).stdout
            assert "UPSTREAM_TOKEN_HINT=dummy" in env
            assert "HTTPS_PROXY=http://127.0.0.1:15001" in env
            search = sb.run(
                "env; for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' '\\n' < $f 2>/dev/null; done; "
                f"echo FILES:; grep -rsl -e '{SECRET_PATTERN}' /etc /root /tmp /home /var; true",
                timeout=120,
            )
            assert SECRET not in search.stdout and SECRET not in search.stderr
            assert search.stdout.rsplit("FILES:", 1)[1].strip() == ""
        finally:
            client.delete_sandbox(sb.name)
