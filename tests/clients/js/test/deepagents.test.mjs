// deepagents JS `LangSmithSandbox` (spec §9.4) over the pinned langsmith client. deepagents 1.14.1
// declares peer langsmith >=0.7.1 <0.10.0, so it is installed only in the langsmith-0.9 set; in a
// set without it these tests are skipped with that reason.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { client, makeSandbox, text, uniqueName, LANGSMITH_VERSION } from "../harness/common.mjs";

let deepagents = null;
try {
  deepagents = await import("deepagents");
} catch (e) {
  if (e?.code !== "ERR_MODULE_NOT_FOUND") throw e;
}
const skip = !deepagents && `deepagents is not installed in this pinned set (langsmith ${LANGSMITH_VERSION}; deepagents needs langsmith <0.10)`;

let sb;
let backend;
let root;
before(async () => {
  if (skip) return;
  sb = await makeSandbox({ name: uniqueName("deepagents") });
  backend = new deepagents.LangSmithSandbox({ sandbox: sb });
  root = `/tmp/${uniqueName("da")}`;
});

test("id and execute", { skip }, async () => {
  assert.equal(backend.id, sb.name);
  assert.equal(backend.isRunning, true);
  const r = await backend.execute("echo hi; echo oops >&2; exit 3");
  assert.deepEqual(r, { output: "hi\n\noops\n", exitCode: 3, truncated: false });
  const ok = await backend.execute("whoami");
  assert.deepEqual(ok, { output: "user\n", exitCode: 0, truncated: false });
});

test("execute timeout", { skip }, async () => {
  await assert.rejects(backend.execute("sleep 30", { timeout: 2 }), (e) => e?.name === "LangSmithCommandTimeoutError");
});

test("write, read, edit (creates parents via /upload)", { skip }, async () => {
  const path = `${root}/src/app.py`;
  const w = await backend.write(path, "def main():\n    return 'old'\n\nprint(main())\n");
  assert.equal(w.error, undefined, w.error);
  assert.equal(w.path, path);
  const r = await backend.read(path);
  assert.equal(r.error, undefined, r.error);
  // BaseSandbox.read numbers the lines (awk in the sandbox, spec §9.4)
  assert.equal(r.content, "     1\tdef main():\n     2\t    return 'old'\n     3\t\n     4\tprint(main())\n");
  assert.equal(r.totalLines, 4);
  const page = await backend.read(path, 1, 2);
  assert.equal(page.content, "     2\t    return 'old'\n     3\t\n");
  assert.deepEqual([page.startLine, page.endLine, page.nextOffset], [2, 3, 3]);
  const e = await backend.edit(path, "'old'", "'new'");
  assert.equal(e.error, undefined, e.error);
  assert.equal(e.occurrences, 1);
  assert.equal((await sb.run(`python3 ${path}`)).stdout, "new\n");
  const multi = await backend.edit(path, "main", "entry");
  assert.match(multi.error ?? "", /Multiple occurrences/);
  const all = await backend.edit(path, "main", "entry", true);
  assert.equal(all.occurrences, 2);
  assert.equal(text(await sb.read(path)), "def entry():\n    return 'new'\n\nprint(entry())\n");
  assert.match((await backend.read(`${root}/missing.txt`)).error ?? "", /not found/);
  assert.match((await backend.edit(`${root}/missing.txt`, "a", "b")).error ?? "", /not found/);
});

test("ls, glob, grep", { skip }, async () => {
  const base = `${root}/tree`;
  for (const [rel, content] of Object.entries({
    "a.py": "import os\nneedle = 1\n",
    "b.txt": "no match\n",
    "sub/c.py": "x = 'needle'\n",
    "sub/deeper/d.md": "needle in md\n",
  })) {
    const w = await backend.write(`${base}/${rel}`, content);
    assert.equal(w.error, undefined, w.error);
  }
  const ls = await backend.ls(base);
  const entries = Object.fromEntries(ls.files.map((f) => [f.path, f]));
  assert.deepEqual(Object.keys(entries).sort(), [`${base}/a.py`, `${base}/b.txt`, `${base}/sub/`]);
  assert.equal(entries[`${base}/sub/`].is_dir, true);
  assert.equal(entries[`${base}/a.py`].size, 21);

  const g = await backend.glob("**/*.py", base);
  assert.deepEqual(g.files.map((f) => f.path).sort(), ["a.py", "sub/c.py"]);
  assert.equal(g.truncated, false);

  const gr = await backend.grep("needle", base);
  assert.deepEqual(
    gr.matches.map((m) => `${m.path}:${m.line}:${m.text}`).sort(),
    [`${base}/a.py:2:needle = 1`, `${base}/sub/c.py:1:x = 'needle'`, `${base}/sub/deeper/d.md:1:needle in md`],
  );
  const grPy = await backend.grep("needle", base, "*.py");
  assert.deepEqual(grPy.matches.map((m) => m.path).sort(), [`${base}/a.py`, `${base}/sub/c.py`]);
});

test("uploadFiles, downloadFiles", { skip }, async () => {
  const bin = new Uint8Array([0, 1, 2, 250, 255, 10]);
  const up = await backend.uploadFiles([
    [`${root}/up/one.txt`, new TextEncoder().encode("one\n")],
    [`${root}/up/deep/two.bin`, bin],
  ]);
  assert.deepEqual(up, [{ path: `${root}/up/one.txt`, error: null }, { path: `${root}/up/deep/two.bin`, error: null }]);
  assert.equal((await sb.run(`cat ${root}/up/one.txt; wc -c < ${root}/up/deep/two.bin`)).stdout, "one\n6\n");
  const down = await backend.downloadFiles([`${root}/up/one.txt`, `${root}/up/deep/two.bin`, `${root}/up/missing`, `${root}/up`]);
  assert.equal(text(down[0].content), "one\n");
  assert.equal(down[0].error, null);
  assert.deepEqual(new Uint8Array(down[1].content), bin);
  assert.deepEqual([down[2].content, down[2].error], [null, "file_not_found"]);
  assert.deepEqual([down[3].content, down[3].error], [null, "is_directory"]);
});

test("delete", { skip }, async () => {
  await backend.write(`${root}/del/x.txt`, "x");
  const d = await backend.delete(`${root}/del`);
  assert.equal(d.error, undefined, d.error);
  assert.equal((await sb.run(`test -e ${root}/del && echo there || echo gone`)).stdout, "gone\n");
});

test("LangSmithSandbox.create({snapshotId}), stop/start, close", { skip }, async () => {
  const name = uniqueName("da-create");
  const created = await deepagents.LangSmithSandbox.create({ snapshotId: sb.snapshot_id, name, timeout: 120 });
  try {
    assert.equal(created.id, name);
    await created.write("/home/user/keep.txt", "kept");
    await created.stop();
    assert.equal(created.isRunning, false);
    await created.start({ timeout: 120 });
    assert.equal(created.isRunning, true);
    assert.deepEqual(await created.execute("cat /home/user/keep.txt"), { output: "kept", exitCode: 0, truncated: false });
  } finally {
    await created.close().catch(() => client().deleteSandbox(name).catch(() => {}));
  }
  assert.equal(created.isRunning, false);
  assert.ok(!(await client().listSandboxes()).some((s) => s.name === name));
});
