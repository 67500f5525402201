"""Test fixture for tests/egress.rs: builds a dumb-HTTP git repository and a PEP 503 simple
index with one wheel under ROOT, then serves ROOT over HTTPS (CERT/KEY) on 127.0.0.1 and
prints the port. Every request's headers are appended to ROOT/../requests.log.

usage: egress_files.py ROOT CERT KEY
"""

import base64
import hashlib
import http.server
import os
import ssl
import subprocess
import sys
import zipfile

root, cert, key = sys.argv[1:4]
log = os.path.join(os.path.dirname(root), "requests.log")


def git(*args, cwd=None):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def make_repo():
    work = os.path.join(os.path.dirname(root), "work")
    os.makedirs(work)
    git("init", "-q", "-b", "main", work)
    with open(os.path.join(work, "hello.txt"), "w") as f:
        f.write("hello from a dumb-http repo\n")
    git("add", "hello.txt", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    bare = os.path.join(root, "repo.git")
    git("clone", "-q", "--bare", work, bare)
    git("update-server-info", cwd=bare)


def make_wheel():
    name, version = "cordon_demo", "0.1"
    files = {
        f"{name}/__init__.py": b"VALUE = 'installed through the egress proxy'\n",
        f"{name}-{version}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: cordon-demo\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: cordon-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    packages = os.path.join(root, "packages")
    os.makedirs(packages)
    wheel = f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(packages, wheel), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    with open(os.path.join(packages, wheel), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    index = os.path.join(root, "simple", "cordon-demo")
    os.makedirs(index)
    with open(os.path.join(index, "index.html"), "w") as f:
        f.write(f'<html><body><a href="../../packages/{wheel}#sha256={sha}">{wheel}</a></body></html>\n')


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=root, **kwargs)

    def log_message(self, *args):
        pass

    def end_headers(self):
        with open(log, "a") as f:
            f.write(f"{self.command} {self.path}\n{self.headers}\n")
        super().end_headers()


os.makedirs(root, exist_ok=True)
make_repo()
make_wheel()
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
