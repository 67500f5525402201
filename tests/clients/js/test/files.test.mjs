// Files through the official JS client: write/read (/upload, /download), stat (HEAD),
// readRange (Range + validators), glob, ls, grep (spec §3.5).
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { clientLacks, makeSandbox, sdk, text, uniqueName } from "../harness/common.mjs";

const HTTP_DATE = /^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT$/;
const RFC_3339 = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/;
const enc = (s) => new TextEncoder().encode(s);
const P = sdk.Sandbox.prototype;

let sb;
let dir;
before(async () => {
  sb = await makeSandbox({ name: uniqueName("files") });
  dir = `/tmp/${uniqueName("files")}`;
});

test("write/read text, owned by the run user", async () => {
  const path = `${dir}/hello.txt`;
  await sb.write(path, "hello wörld\n");
  assert.deepEqual(await sb.read(path), enc("hello wörld\n"));
  assert.equal((await sb.run(`cat ${path}; stat -c '%U %s' ${path}`)).stdout, "hello wörld\nuser 13\n");
});

test("write/read binary", async () => {
  const data = new Uint8Array(256 * 64 + 3);
  for (let i = 0; i < 256 * 64; i++) data[i] = i % 256;
  data.set([0, 255, 0], 256 * 64);
  const path = `${dir}/bin.dat`;
  await sb.write(path, data);
  assert.deepEqual(await sb.read(path), data);
  assert.equal((await sb.run(`sha256sum ${path}`)).stdout.split(" ")[0], createHash("sha256").update(data).digest("hex"));
});

test("write overwrites, creates parents, empty file, odd names", async () => {
  await sb.write(`${dir}/over.txt`, "a much longer first version\n");
  await sb.write(`${dir}/over.txt`, "short\n");
  assert.equal(text(await sb.read(`${dir}/over.txt`)), "short\n");
  await sb.write(`${dir}/a/b/c/deep.txt`, "deep");
  assert.equal(text(await sb.read(`${dir}/a/b/c/deep.txt`)), "deep");
  await sb.write(`${dir}/empty`, new Uint8Array(0));
  assert.equal((await sb.read(`${dir}/empty`)).length, 0);
  const odd = `${dir}/with space/ünï cødé #1?.txt`;
  await sb.write(odd, "odd");
  assert.equal(text(await sb.read(odd)), "odd");
});

test("relative path is under the home directory", async () => {
  const name = `${uniqueName("rel")}.txt`;
  await sb.write(name, "rel");
  assert.equal((await sb.run(`cat /home/user/${name}`)).stdout, "rel");
  assert.equal(text(await sb.read(name)), "rel");
});

test("large file round trip (8 MiB)", async () => {
  const data = new Uint8Array(8 * 1024 * 1024);
  for (let i = 0; i < data.length; i += 4096) data[i] = (i / 4096) % 251;
  await sb.write(`${dir}/large.bin`, data);
  const back = await sb.read(`${dir}/large.bin`);
  assert.equal(back.length, data.length);
  assert.equal(createHash("sha256").update(back).digest("hex"), createHash("sha256").update(data).digest("hex"));
});

test("read a missing file -> LangSmithResourceNotFoundError('file')", async () => {
  await assert.rejects(sb.read(`${dir}/missing`), (e) => {
    assert.ok(e instanceof sdk.LangSmithResourceNotFoundError, `${e?.name}: ${e?.message}`);
    assert.equal(e.resourceType, "file");
    return true;
  });
});

test("read a directory -> error mentioning 'is a directory'", async () => {
  await sb.run(`mkdir -p ${dir}/adir`);
  await assert.rejects(sb.read(`${dir}/adir`), (e) => {
    assert.ok(e instanceof sdk.LangSmithSandboxError, `${e?.name}: ${e?.message}`);
    assert.match(String(e.message).toLowerCase(), /is a directory/);
    return true;
  });
});

test("write to an unwritable location fails", async () => {
  await assert.rejects(sb.write("/proc/cordon-nope/x", "x"), sdk.LangSmithSandboxError);
});

test("stat", { skip: clientLacks(P, "stat") }, async () => {
  const path = `${dir}/stat.txt`;
  await sb.write(path, "0123456789");
  const st = await sb.stat(path);
  assert.equal(st.size_bytes, 10);
  assert.ok(st.etag && !st.etag.startsWith("W/"), `a strong ETag is required: ${st.etag}`);
  assert.match(st.last_modified ?? "", HTTP_DATE);
  assert.ok(st.content_type);
  assert.equal((await sb.stat(path)).etag, st.etag);
  await sb.write(path, "0123456789abc");
  const st2 = await sb.stat(path);
  assert.equal(st2.size_bytes, 13);
  assert.notEqual(st2.etag, st.etag);
  await assert.rejects(sb.stat(`${dir}/missing`), (e) => e instanceof sdk.LangSmithResourceNotFoundError && e.resourceType === "file");
});

test("readRange", { skip: clientLacks(P, "readRange", "stat") }, async () => {
  const path = `${dir}/range.txt`;
  const data = enc(Array.from({ length: 1000 }, (_, i) => `${String(i).padStart(4, "0")}\n`).join(""));
  await sb.write(path, data);
  const { etag } = await sb.stat(path);

  const chunk = await sb.readRange(path, { start: 10, end: 19 });
  assert.deepEqual(chunk.content, data.slice(10, 20));
  assert.deepEqual([chunk.start, chunk.total_bytes, chunk.partial, chunk.unchanged], [10, 5000, true, false]);
  assert.equal(chunk.etag, etag);

  const open = await sb.readRange(path, { start: 4990 });
  assert.deepEqual([open.content, open.start, open.total_bytes], [data.slice(4990), 4990, 5000]);
  const clamped = await sb.readRange(path, { start: 4995, end: 999_999 });
  assert.deepEqual([clamped.content, clamped.partial], [data.slice(4995), true]);
  const suffix = await sb.readRange(path, { suffixBytes: 7 });
  assert.deepEqual([suffix.content, suffix.start, suffix.total_bytes], [data.slice(-7), 4993, 5000]);
});

test("readRange validators (If-None-Match, If-Range)", { skip: clientLacks(P, "readRange", "stat") }, async () => {
  const path = `${dir}/validators.txt`;
  await sb.write(path, "version one, long enough");
  const { etag } = await sb.stat(path);
  const unchanged = await sb.readRange(path, { start: 0, end: 3, ifNoneMatch: etag });
  assert.equal(unchanged.unchanged, true);
  assert.equal(unchanged.content.length, 0);
  const same = await sb.readRange(path, { start: 8, end: 10, ifRange: etag });
  assert.equal(same.partial, true);
  assert.equal(text(same.content), "one");
  await sb.write(path, "version two, rewritten!!");
  const restarted = await sb.readRange(path, { start: 8, end: 10, ifRange: etag });
  assert.equal(restarted.partial, false, "a stale If-Range must answer 200 with the whole file");
  assert.equal(text(restarted.content), "version two, rewritten!!");
  assert.notEqual(restarted.etag, etag);
  const changed = await sb.readRange(path, { start: 0, end: 3, ifNoneMatch: etag });
  assert.equal(changed.unchanged, false);
  assert.equal(text(changed.content), "vers");
});

test("readRange past the end -> LangSmithSandboxOperationError quoting */total; missing -> not found",
  { skip: clientLacks(P, "readRange") }, async () => {
    const path = `${dir}/short.txt`;
    await sb.write(path, "12345");
    await assert.rejects(sb.readRange(path, { start: 5 }), (e) => {
      assert.ok(e instanceof sdk.LangSmithSandboxOperationError, `${e?.name}: ${e?.message}`);
      assert.match(e.message, /\*\/5/);
      return true;
    });
    await assert.rejects(sb.readRange(`${dir}/missing`, { start: 0, end: 1 }), sdk.LangSmithResourceNotFoundError);
  });

// ---------------------------------------------------------------------------- glob, ls, grep

const TREE = {
  "a.py": "import os\nneedle = 1\n",
  "b.txt": "no match here\nabc\n",
  "sub/c.py": "def f():\n    return 'needle'\n",
  "sub/deeper/d.md": "a needle in markdown\nneedle twice\n",
  ".hidden/e.py": "needle hidden\n",
};
let treeRoot;
async function tree() {
  if (!treeRoot) {
    const root = `${dir}/tree`;
    for (const [rel, content] of Object.entries(TREE)) await sb.write(`${root}/${rel}`, content);
    treeRoot = root;
  }
  return treeRoot;
}
const paths = (r) => new Set(r.matches.map((m) => m.path));
const sorted = (s) => [...s].sort();

test("glob", { skip: clientLacks(P, "glob") }, async () => {
  const root = await tree();
  const r = await sb.glob("**/*.py", root);
  assert.deepEqual(Object.keys(r).sort(), ["matches", "truncated"]);
  assert.equal(r.truncated, false);
  const got = paths(r);
  assert.ok(got.has(`${root}/a.py`) && got.has(`${root}/sub/c.py`), sorted(got).join(","));
  for (const p of got) assert.ok([`${root}/a.py`, `${root}/sub/c.py`, `${root}/.hidden/e.py`].includes(p), p);
  for (const m of r.matches) {
    assert.deepEqual(Object.keys(m).sort(), ["is_dir", "modified_at", "path", "size_bytes"]);
    assert.equal(m.is_dir, false);
    assert.equal(m.size_bytes, Buffer.byteLength(TREE[m.path.slice(root.length + 1)]));
    assert.match(m.modified_at, RFC_3339);
  }
  assert.deepEqual(sorted(paths(await sb.glob("*.py", root))), [`${root}/a.py`]);
  assert.deepEqual(sorted(paths(await sb.glob("sub/*", root))), [`${root}/sub/c.py`, `${root}/sub/deeper`]);
  assert.deepEqual(sorted(paths(await sb.glob("?.txt", root))), [`${root}/b.txt`]);
  assert.deepEqual(sorted(paths(await sb.glob("[ab].*", root))), [`${root}/a.py`, `${root}/b.txt`]);
  const limited = await sb.glob("**", root, { limit: 2 });
  assert.equal(limited.matches.length, 2);
  assert.equal(limited.truncated, true);
  await assert.rejects(sb.glob("*", `${dir}/no-such-dir`), sdk.LangSmithResourceNotFoundError);
});

test("ls", { skip: clientLacks(P, "ls") }, async () => {
  const root = await tree();
  const r = await sb.ls(root);
  const entries = Object.fromEntries(r.matches.map((m) => [m.path, m]));
  for (const p of [`${root}/a.py`, `${root}/b.txt`, `${root}/sub`]) assert.ok(p in entries, p);
  for (const p of Object.keys(entries)) assert.ok([`${root}/a.py`, `${root}/b.txt`, `${root}/sub`, `${root}/.hidden`].includes(p), p);
  assert.equal(entries[`${root}/sub`].is_dir, true);
  assert.equal(entries[`${root}/a.py`].is_dir, false);
  assert.equal(entries[`${root}/a.py`].size_bytes, Buffer.byteLength(TREE["a.py"]));
});

test("grep", { skip: clientLacks(P, "grep") }, async () => {
  const root = await tree();
  const r = await sb.grep("needle", root);
  assert.deepEqual(Object.keys(r).sort(), ["matches", "truncated"]);
  assert.equal(r.truncated, false);
  const found = new Set(r.matches.map((m) => `${m.path}:${m.line}:${m.text}`));
  const expected = [
    `${root}/a.py:2:needle = 1`,
    `${root}/sub/c.py:2:    return 'needle'`,
    `${root}/sub/deeper/d.md:1:a needle in markdown`,
    `${root}/sub/deeper/d.md:2:needle twice`,
  ];
  for (const e of expected) assert.ok(found.has(e), `missing ${e} in ${sorted(found).join(" | ")}`);
  for (const f of found) assert.ok([...expected, `${root}/.hidden/e.py:1:needle hidden`].includes(f), f);
  // literal, not a regex
  assert.deepEqual((await sb.grep("a.c", root)).matches, []);
  assert.deepEqual((await sb.grep("abc", root)).matches.map((m) => [m.path, m.line, m.text]), [[`${root}/b.txt`, 2, "abc"]]);
  const byBase = paths(await sb.grep("needle", root, { glob: "*.py" }));
  assert.ok(byBase.has(`${root}/a.py`) && byBase.has(`${root}/sub/c.py`));
  for (const p of byBase) assert.ok(p.endsWith(".py"), p);
  assert.deepEqual(sorted(paths(await sb.grep("needle", root, { glob: "sub/**/*.md" }))), [`${root}/sub/deeper/d.md`]);
  const limited = await sb.grep("needle", root, { limit: 1 });
  assert.equal(limited.matches.length, 1);
  assert.equal(limited.truncated, true);
  await assert.rejects(sb.grep("x", `${dir}/no-such-dir`), sdk.LangSmithResourceNotFoundError);
});
