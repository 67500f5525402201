"""Files through the official client: upload/download, HEAD, ranges, glob, grep (spec §3.5)."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from conftest import unique_name
from langsmith.sandbox import ResourceNotFoundError, SandboxOperationError

HTTP_DATE = re.compile(r"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT$")
RFC_3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


@pytest.fixture
def tmpdir_in_sandbox(shared_sandbox):
    """A fresh directory in the shared sandbox, removed afterwards."""
    path = f"/tmp/{unique_name('files')}"
    shared_sandbox.run(f"mkdir -p {path}")
    yield path
    shared_sandbox.run(f"rm -rf {path}")


def test_write_read_text(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/hello.txt"
    shared_sandbox.write(path, "hello wörld\n")
    assert shared_sandbox.read(path) == "hello wörld\n".encode()
    # The file is really there, owned by the run user (§3.5.1 rec.).
    r = shared_sandbox.run(f"cat {path}; stat -c '%U %s' {path}")
    assert r.stdout == "hello wörld\nuser 13\n"


def test_write_read_binary(shared_sandbox, tmpdir_in_sandbox):
    data = bytes(range(256)) * 64 + b"\x00\xff\x00"
    path = f"{tmpdir_in_sandbox}/bin.dat"
    shared_sandbox.write(path, data)
    assert shared_sandbox.read(path) == data
    assert shared_sandbox.run(f"sha256sum {path}").stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_write_overwrites_and_truncates(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/over.txt"
    shared_sandbox.write(path, "a much longer first version\n")
    shared_sandbox.write(path, "short\n")
    assert shared_sandbox.read(path) == b"short\n"


def test_write_creates_parent_directories(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/a/b/c/deep.txt"
    shared_sandbox.write(path, "deep")
    assert shared_sandbox.read(path) == b"deep"
    assert shared_sandbox.run(f"test -d {tmpdir_in_sandbox}/a/b/c && echo dir").stdout == "dir\n"


def test_write_empty_file(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/empty"
    shared_sandbox.write(path, b"")
    assert shared_sandbox.read(path) == b""
    assert shared_sandbox.stat(path).size_bytes == 0


def test_relative_path_is_under_home(shared_sandbox):
    """Relative paths resolve from the home directory (§3.5.2)."""
    name = unique_name("rel") + ".txt"
    shared_sandbox.write(name, "relative")
    try:
        assert shared_sandbox.read(f"/home/user/{name}") == b"relative"
        assert shared_sandbox.read(name) == b"relative"
    finally:
        shared_sandbox.run(f"rm -f /home/user/{name}")


def test_path_with_spaces_and_unicode(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/dir with space/fïlé & more?.txt"
    shared_sandbox.write(path, "odd name")
    assert shared_sandbox.read(path) == b"odd name"
    assert shared_sandbox.run(f"cat '{path}'").stdout == "odd name"


def test_large_file_round_trip(shared_sandbox, tmpdir_in_sandbox):
    data = os.urandom(8 * 1024 * 1024)
    path = f"{tmpdir_in_sandbox}/large.bin"
    shared_sandbox.write(path, data, timeout=120)
    assert shared_sandbox.read(path, timeout=120) == data
    assert shared_sandbox.run(f"sha256sum {path}").stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_read_missing_file(shared_sandbox, tmpdir_in_sandbox):
    with pytest.raises(ResourceNotFoundError) as e:
        shared_sandbox.read(f"{tmpdir_in_sandbox}/nope.txt")
    assert e.value.resource_type == "file"


def test_read_directory(shared_sandbox, tmpdir_in_sandbox):
    """§3.5.2 rec.: 400 ReadError "...: is a directory" (deepagents maps on that text)."""
    with pytest.raises(SandboxOperationError) as e:
        shared_sandbox.read(tmpdir_in_sandbox)
    assert "is a directory" in str(e.value)
    assert e.value.operation == "read"


def test_read_unreadable_file(shared_sandbox, tmpdir_in_sandbox):
    """Reads run as the sandbox user, so a file it cannot read is refused (§3.5.2)."""
    path = f"{tmpdir_in_sandbox}/locked"
    shared_sandbox.write(path, "secret")
    shared_sandbox.run(f"chmod 000 {path}")
    with pytest.raises(SandboxOperationError) as e:
        shared_sandbox.read(path)
    assert e.value.error_type in ("PermissionDenied", "ReadError"), e.value.error_type
    with pytest.raises(SandboxOperationError):
        shared_sandbox.read("/etc/shadow")


def test_write_to_unwritable_location(shared_sandbox):
    with pytest.raises(SandboxOperationError) as e:
        shared_sandbox.write("/etc/cordon-compat-should-not-exist", "x")
    assert e.value.error_type in ("PermissionDenied", "WriteError"), e.value.error_type
    r = shared_sandbox.run("ls /etc/cordon-compat-should-not-exist 2>&1; true")
    assert "No such file" in r.stdout


def test_write_under_a_file_fails(shared_sandbox, tmpdir_in_sandbox):
    shared_sandbox.write(f"{tmpdir_in_sandbox}/plain", "i am a file")
    with pytest.raises(SandboxOperationError) as e:
        shared_sandbox.write(f"{tmpdir_in_sandbox}/plain/child.txt", "x")
    assert e.value.operation == "write" or e.value.error_type == "PermissionDenied", (e.value.operation, e.value.error_type)
    assert shared_sandbox.read(f"{tmpdir_in_sandbox}/plain") == b"i am a file"


# ---------------------------------------------------------------------------- stat and ranges


def test_stat(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/stat.txt"
    shared_sandbox.write(path, "0123456789")
    st = shared_sandbox.stat(path)
    assert st.size_bytes == 10
    assert st.etag and not st.etag.startswith("W/"), f"a strong ETag is required: {st.etag!r}"
    assert st.last_modified and HTTP_DATE.match(st.last_modified), st.last_modified
    assert st.content_type
    # Same content, same validator; new content, new validator.
    assert shared_sandbox.stat(path).etag == st.etag
    shared_sandbox.write(path, "0123456789abc")
    st2 = shared_sandbox.stat(path)
    assert st2.size_bytes == 13
    assert st2.etag != st.etag


def test_stat_missing(shared_sandbox, tmpdir_in_sandbox):
    with pytest.raises(ResourceNotFoundError) as e:
        shared_sandbox.stat(f"{tmpdir_in_sandbox}/missing")
    assert e.value.resource_type == "file"


def test_read_range(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/range.txt"
    data = b"".join(b"%04d\n" % i for i in range(1000))  # 5000 bytes
    shared_sandbox.write(path, data)
    etag = shared_sandbox.stat(path).etag

    chunk = shared_sandbox.read_range(path, start=10, end=19)
    assert (chunk.content, chunk.start, chunk.end, chunk.total_bytes) == (data[10:20], 10, 20, 5000)
    assert chunk.partial and not chunk.unchanged
    assert chunk.etag == etag

    open_ended = shared_sandbox.read_range(path, start=4990)
    assert (open_ended.content, open_ended.start, open_ended.total_bytes) == (data[4990:], 4990, 5000)

    clamped = shared_sandbox.read_range(path, start=4995, end=999_999)
    assert clamped.content == data[4995:] and clamped.partial

    suffix = shared_sandbox.read_range(path, suffix_bytes=7)
    assert (suffix.content, suffix.start, suffix.total_bytes) == (data[-7:], 4993, 5000)


def test_read_range_validators(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/validators.txt"
    shared_sandbox.write(path, b"version one, long enough")
    etag = shared_sandbox.stat(path).etag

    unchanged = shared_sandbox.read_range(path, start=0, end=3, if_none_match=etag)
    assert unchanged.unchanged and unchanged.content == b""

    same = shared_sandbox.read_range(path, start=8, end=10, if_range=etag)
    assert same.partial and same.content == b"one"

    shared_sandbox.write(path, b"version two, rewritten!!")
    restarted = shared_sandbox.read_range(path, start=8, end=10, if_range=etag)
    assert not restarted.partial, "a stale If-Range must answer 200 with the whole file"
    assert restarted.content == b"version two, rewritten!!"
    assert restarted.etag != etag

    changed = shared_sandbox.read_range(path, start=0, end=3, if_none_match=etag)
    assert not changed.unchanged and changed.content == b"vers"


def test_read_range_past_end(shared_sandbox, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/short.txt"
    shared_sandbox.write(path, b"12345")
    with pytest.raises(SandboxOperationError) as e:
        shared_sandbox.read_range(path, start=5)
    assert "*/5" in str(e.value), "416 must carry Content-Range: bytes */<total>"


def test_read_range_missing(shared_sandbox, tmpdir_in_sandbox):
    with pytest.raises(ResourceNotFoundError):
        shared_sandbox.read_range(f"{tmpdir_in_sandbox}/missing", start=0, end=1)


# ---------------------------------------------------------------------------- glob, ls, grep


@pytest.fixture
def tree(shared_sandbox, tmpdir_in_sandbox):
    root = tmpdir_in_sandbox
    files = {
        "a.py": "import os\nneedle = 1\n",
        "b.txt": "no match here\nabc\n",
        "sub/c.py": "def f():\n    return 'needle'\n",
        "sub/deeper/d.md": "a needle in markdown\nneedle twice\n",
        ".hidden/e.py": "needle hidden\n",
    }
    for rel, content in files.items():
        shared_sandbox.write(f"{root}/{rel}", content)
    return root, files


def test_glob_recursive(shared_sandbox, tree):
    root, files = tree
    result = shared_sandbox.glob("**/*.py", root)
    paths = {m.path for m in result}
    assert {f"{root}/a.py", f"{root}/sub/c.py"} <= paths
    assert paths <= {f"{root}/a.py", f"{root}/sub/c.py", f"{root}/.hidden/e.py"}
    assert result.truncated is False
    for m in result:
        assert m.is_dir is False
        rel = m.path[len(root) + 1:]
        assert m.size_bytes == len(files[rel].encode())
        assert m.modified_at and RFC_3339.match(m.modified_at), m.modified_at


def test_glob_single_segment(shared_sandbox, tree):
    root, _ = tree
    assert {m.path for m in shared_sandbox.glob("*.py", root)} == {f"{root}/a.py"}
    assert {m.path for m in shared_sandbox.glob("sub/*", root)} == {f"{root}/sub/c.py", f"{root}/sub/deeper"}
    assert {m.path for m in shared_sandbox.glob("?.txt", root)} == {f"{root}/b.txt"}
    assert {m.path for m in shared_sandbox.glob("[ab].*", root)} == {f"{root}/a.py", f"{root}/b.txt"}


def test_glob_limit_sets_truncated(shared_sandbox, tree):
    root, _ = tree
    result = shared_sandbox.glob("**", root, limit=2)
    assert len(result) == 2
    assert result.truncated is True


def test_glob_missing_root(shared_sandbox, tmpdir_in_sandbox):
    with pytest.raises(ResourceNotFoundError):
        shared_sandbox.glob("*", f"{tmpdir_in_sandbox}/no-such-dir")


def test_ls(shared_sandbox, tree):
    root, _ = tree
    entries = {m.path: m for m in shared_sandbox.ls(root)}
    assert set(entries) >= {f"{root}/a.py", f"{root}/b.txt", f"{root}/sub"}
    assert set(entries) <= {f"{root}/a.py", f"{root}/b.txt", f"{root}/sub", f"{root}/.hidden"}
    assert entries[f"{root}/sub"].is_dir is True
    assert entries[f"{root}/a.py"].is_dir is False
    assert entries[f"{root}/a.py"].size_bytes == len("import os\nneedle = 1\n")


def test_grep(shared_sandbox, tree):
    root, _ = tree
    result = shared_sandbox.grep("needle", root)
    found = {(m.path, m.line, m.text) for m in result}
    expected = {
        (f"{root}/a.py", 2, "needle = 1"),
        (f"{root}/sub/c.py", 2, "    return 'needle'"),
        (f"{root}/sub/deeper/d.md", 1, "a needle in markdown"),
        (f"{root}/sub/deeper/d.md", 2, "needle twice"),
    }
    assert expected <= found
    assert found <= expected | {(f"{root}/.hidden/e.py", 1, "needle hidden")}
    assert result.truncated is False


def test_grep_is_literal(shared_sandbox, tree):
    root, _ = tree
    assert [m.text for m in shared_sandbox.grep("a.c", root)] == []
    assert [(m.path, m.text) for m in shared_sandbox.grep("abc", root)] == [(f"{root}/b.txt", "abc")]


def test_grep_glob_filters(shared_sandbox, tree):
    root, _ = tree
    by_basename = {m.path for m in shared_sandbox.grep("needle", root, glob="*.py")}
    assert f"{root}/a.py" in by_basename and f"{root}/sub/c.py" in by_basename
    assert all(p.endswith(".py") for p in by_basename)
    by_path = {m.path for m in shared_sandbox.grep("needle", root, glob="sub/**/*.md")}
    assert by_path == {f"{root}/sub/deeper/d.md"}


def test_grep_limit(shared_sandbox, tree):
    root, _ = tree
    result = shared_sandbox.grep("needle", root, limit=1)
    assert len(result) == 1
    assert result.truncated is True


def test_grep_missing_root(shared_sandbox, tmpdir_in_sandbox):
    with pytest.raises(ResourceNotFoundError):
        shared_sandbox.grep("x", f"{tmpdir_in_sandbox}/no-such-dir")
