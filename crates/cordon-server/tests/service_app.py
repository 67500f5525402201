"""A small web app run inside a sandbox by the service-URL tests (Python stdlib only).

    python3 service_app.py PORT

GET /            an HTML page ("hello from the sandbox")
GET /headers     the request's method, path and headers as JSON
POST|PUT /echo   the request body back, with the request's content type
GET /ws          a WebSocket (RFC 6455) that echoes text and binary messages
"""

import base64
import hashlib
import json
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAGE = b"<!doctype html><title>sandbox app</title><h1 id=greeting>hello from the sandbox</h1>"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path.startswith("/headers"):
            seen = {"method": self.command, "path": self.path, "headers": dict(self.headers.items())}
            return self.reply(200, json.dumps(seen).encode(), "application/json")
        if self.path == "/":
            return self.reply(200, PAGE, "text/html; charset=utf-8")
        self.reply(404, b"not found", "text/plain")

    do_HEAD = do_GET

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.startswith("/echo"):
            return self.reply(200, body, self.headers.get("Content-Type", "application/octet-stream"))
        self.reply(404, b"not found", "text/plain")

    do_PUT = do_POST

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            frame = read_frame(self.rfile)
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 0x8:
                self.wfile.write(encode_frame(0x8, payload[:2]))
                self.wfile.flush()
                return
            if opcode == 0x9:
                self.wfile.write(encode_frame(0xA, payload))
            elif opcode in (0x1, 0x2):
                self.wfile.write(encode_frame(opcode, payload))
            self.wfile.flush()


def read_exact(stream, n):
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def read_frame(stream):
    """One unfragmented client frame: (opcode, unmasked payload), or None at the end."""
    head = read_exact(stream, 2)
    if head is None:
        return None
    opcode, length = head[0] & 0x0F, head[1] & 0x7F
    if length == 126:
        length = struct.unpack(">H", read_exact(stream, 2))[0]
    elif length == 127:
        length = struct.unpack(">Q", read_exact(stream, 8))[0]
    mask = read_exact(stream, 4) if head[1] & 0x80 else b"\0\0\0\0"
    payload = read_exact(stream, length) if length else b""
    if mask is None or payload is None:
        return None
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def encode_frame(opcode, payload):
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
    return head + payload


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
