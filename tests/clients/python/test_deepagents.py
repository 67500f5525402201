"""deepagents' LangSmith backend (`deepagents.backends.langsmith.LangSmithSandbox`, spec §9) over
the official client: it drives exec, /upload and /download, and runs python3/grep/coreutils
scripts inside the default snapshot (§9.5)."""

from __future__ import annotations

import pytest
from conftest import unique_name

from deepagents.backends.langsmith import LangSmithSandbox


@pytest.fixture
def backend(shared_sandbox):
    root = f"/tmp/{unique_name('deepagents')}"
    shared_sandbox.run(f"mkdir -p {root}")
    yield LangSmithSandbox(shared_sandbox), root
    shared_sandbox.run(f"rm -rf {root}")


def test_id_and_execute(backend, shared_sandbox):
    be, _ = backend
    assert be.id == shared_sandbox.name
    ok = be.execute("echo hi")
    assert (ok.output, ok.exit_code, ok.truncated) == ("hi\n", 0, False)
    failed = be.execute("echo out; echo err >&2; exit 2")
    assert failed.exit_code == 2
    assert failed.output == "out\n\nerr\n"


def test_execute_timeout(backend):
    be, _ = backend
    from langsmith.sandbox import CommandTimeoutError

    with pytest.raises(CommandTimeoutError):
        be.execute("sleep 30", timeout=2)


def test_write_read_edit_delete(backend):
    be, root = backend
    path = f"{root}/pkg/mod.py"
    written = be.write(path, "def f():\n    return 1\n\nprint(f())\n")
    assert written.error is None and written.path == path

    read = be.read(path)
    assert read.error is None
    assert read.file_data["content"] == "def f():\n    return 1\n\nprint(f())"
    assert (read.total_lines, read.start_line, read.end_line) == (4, 1, 4)
    page = be.read(path, offset=1, limit=1)
    assert page.file_data["content"] == "    return 1" and page.next_offset == 2

    edited = be.edit(path, "return 1", "return 42")
    assert edited.error is None and edited.occurrences == 1
    assert be.execute(f"python3 {path}").output == "42\n"
    assert be.edit(path, "not in the file", "x").error

    gone = be.delete(path)
    assert gone.error is None
    assert be.read(path).error == f"File '{path}': file_not_found"


def test_edit_large_payload(backend):
    """Edits above 50 KB go through uploaded temp files instead of a heredoc (§9.2)."""
    be, root = backend
    path = f"{root}/big.txt"
    old = "A" * 60_000
    assert be.write(path, f"head\n{old}\ntail\n").error is None
    result = be.edit(path, old, "B" * 70_000)
    assert result.error is None and result.occurrences == 1
    content = be.execute(f"wc -c < {path}").output.strip()
    assert content == str(len("head\n") + 70_000 + len("\ntail\n"))


def test_ls_glob_grep(backend):
    be, root = backend
    for rel, text in {"a.py": "needle\n", "b.txt": "hay\n", "sub/c.py": "x = 'needle'\n"}.items():
        assert be.write(f"{root}/{rel}", text).error is None

    ls = be.ls(root)
    assert ls.error is None
    entries = {e["path"]: e["is_dir"] for e in ls.entries}
    assert entries == {f"{root}/a.py": False, f"{root}/b.txt": False, f"{root}/sub": True}

    glob = be.glob("**/*.py", root)
    assert glob.error is None
    assert {m["path"] for m in glob.matches} == {f"{root}/a.py", f"{root}/sub/c.py"}

    grep = be.grep("needle", root)
    assert grep.error is None
    assert {(m["path"], m["line"], m["text"]) for m in grep.matches} == {
        (f"{root}/a.py", 1, "needle"),
        (f"{root}/sub/c.py", 1, "x = 'needle'"),
    }
    only_py = be.grep("needle", root, glob="*.py")
    assert len(only_py.matches) == 2


def test_upload_download_files(backend):
    be, root = backend
    blob = bytes(range(256))
    up = be.upload_files([(f"{root}/new/dir/blob.bin", blob), ("relative.txt", b"x")])
    assert [(r.path, r.error) for r in up] == [(f"{root}/new/dir/blob.bin", None), ("relative.txt", "invalid_path")]
    down = be.download_files([f"{root}/new/dir/blob.bin", f"{root}/missing", f"{root}/new", "rel"])
    assert down[0].content == blob and down[0].error is None
    assert down[1].error == "file_not_found"
    assert down[2].error == "is_directory"
    assert down[3].error == "invalid_path"


def test_async_backend_uses_exec_scripts(backend):
    """`aread` is not overridden: it runs BaseSandbox's python3 read script over exec (§9.2, §9.3)."""
    import asyncio

    be, root = backend
    path = f"{root}/async.txt"
    assert be.write(path, "one\ntwo\nthree\n").error is None

    async def main():
        executed = await be.aexecute("echo from-aexecute")
        read = await be.aread(path, offset=1, limit=2)
        return executed, read

    executed, read = asyncio.run(main())
    assert (executed.output, executed.exit_code) == ("from-aexecute\n", 0)
    assert read.error is None
    assert read.file_data["content"] == "two\nthree"
