// Node's fetch through Cordon's egress proxy (spec §6.1), driven by the official JS client: a
// default-snapshot sandbox created with a `proxy_config` header rule (an opaque secret) runs the
// host's node (v20, uploaded with the client's write()) with the pinned `undici`'s
// `EnvHttpProxyAgent` as the global dispatcher (node 20's fetch ignores HTTP(S)_PROXY), and
// fetches an HTTPS upstream on loopback by name. The upstream receives the rule's header with
// the secret; node's process.env in the sandbox never holds it. Without the dispatcher the
// same fetch fails (the sandbox has no other way out): the positive control.
//
// Its own `cordon serve` with `--allow-egress-cidr 127.0.0.0/8`, `--egress-any-port`,
// `--egress-resolver` (a DNS server here answering 127.0.0.1) and `--egress-ca` (the upstream's
// test CA, made with openssl). Skipped for pinned sets without undici (langsmith-0.9), clients
// without the proxy_config helpers, or a host without openssl.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createSocket } from "node:dgram";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { createServer } from "node:https";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { sdk, SandboxClient, uniqueName } from "../harness/common.mjs";
import { CordonServer, registryServeArgs } from "../harness/server.mjs";

const SECRET = "jsClientOpaqueSecret-5d0c3a";
const HOST = "upstream.egress.test";
const NODE = "/usr/bin/node";

const envRequire = createRequire(join(process.env.CORDON_JS_ENV, "package.json"));
function undiciDir() {
  try {
    return dirname(envRequire.resolve("undici/package.json"));
  } catch {
    return null;
  }
}
const openssl = (...args) => spawnSync("openssl", args, { encoding: "utf8" });
const skip =
  (!undiciDir() && "this pinned set has no undici (EnvHttpProxyAgent)") ||
  ((typeof sdk.proxyConfig !== "function" || typeof sdk.opaqueSecret !== "function") &&
    "this langsmith version has no proxy_config helpers") ||
  (openssl("version").status !== 0 && "openssl is needed for the upstream's test CA") ||
  (!existsSync(NODE) && `no ${NODE} to run in the sandbox`);

/** A UDP DNS server on 127.0.0.1: every A query gets 127.0.0.1, other types no answer. */
function startDns() {
  const sock = createSocket("udp4");
  sock.on("message", (query, peer) => {
    if (query.length < 12) return;
    let end = 12;
    while (end < query.length && query[end] !== 0) end += query[end] + 1;
    if (end + 5 > query.length) return;
    const question = query.subarray(12, end + 5);
    const isA = query.readUInt16BE(end + 1) === 1;
    const header = Buffer.alloc(12);
    query.copy(header, 0, 0, 2);
    header.writeUInt16BE(0x8180, 2);
    header.writeUInt16BE(1, 4);
    header.writeUInt16BE(isA ? 1 : 0, 6);
    const answer = isA ? Buffer.from([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 127, 0, 0, 1]) : Buffer.alloc(0);
    sock.send(Buffer.concat([header, question, answer]), peer.port, peer.address);
  });
  return new Promise((res) => sock.bind(0, "127.0.0.1", () => res(sock)));
}

/** HTTPS on 127.0.0.1 with a leaf for HOST from its own CA; records each request's headers. */
function startUpstream(dir) {
  const f = (n) => join(dir, n);
  const run = (...args) => {
    const r = openssl(...args);
    if (r.status !== 0) throw new Error(`openssl ${args[0]}: ${r.stderr}`);
  };
  run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA", "-keyout", f("ca.key"), "-out", f("ca.pem"));
  run("req", "-newkey", "rsa:2048", "-nodes", "-subj", `/CN=${HOST}`, "-keyout", f("key.pem"), "-out", f("leaf.csr"));
  writeFileSync(f("ext.cnf"), `subjectAltName=DNS:${HOST}\nbasicConstraints=CA:FALSE\n`);
  run("x509", "-req", "-days", "1", "-in", f("leaf.csr"), "-CA", f("ca.pem"), "-CAkey", f("ca.key"), "-CAcreateserial", "-extfile", f("ext.cnf"), "-out", f("cert.pem"));
  const requests = [];
  const server = createServer({ key: readFileSync(f("key.pem")), cert: readFileSync(f("cert.pem")) }, (req, res) => {
    requests.push({ path: req.url, headers: req.headers });
    res.end("upstream ok from node\n");
  });
  return new Promise((res) => server.listen(0, "127.0.0.1", () => res({ server, requests, ca: f("ca.pem"), port: server.address().port })));
}

/** JSON of a client object, each object once (it refers back to its client). */
function acyclicJson(value) {
  const seen = new WeakSet();
  return JSON.stringify(value, (_, v) => {
    if (typeof v === "object" && v !== null) {
      if (seen.has(v)) return undefined;
      seen.add(v);
    }
    return v;
  });
}

// What runs in the sandbox: a fetch without a proxy-aware dispatcher (must fail), then with
// undici's EnvHttpProxyAgent; prints one JSON line, process.env included.
const SCRIPT = `
const { setGlobalDispatcher, EnvHttpProxyAgent } = require("./undici");
(async () => {
  const url = process.argv[2];
  let direct;
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(10000) });
    direct = "status " + r.status;
  } catch (e) {
    direct = "failed: " + (e.cause?.code ?? e.message);
  }
  setGlobalDispatcher(new EnvHttpProxyAgent());
  const r = await fetch(url, { signal: AbortSignal.timeout(30000) });
  console.log(JSON.stringify({ direct, status: r.status, body: await r.text(), env: process.env }));
})().catch((e) => { console.error(e); process.exit(1); });
`;

test("node fetch with undici's EnvHttpProxyAgent goes out through the proxy; the secret stays outside", { skip, timeout: 170_000 }, async () => {
  const tmp = mkdtempSync(join(tmpdir(), "cordon-js-egress-"));
  const upstream = await startUpstream(tmp);
  const dns = await startDns();
  const server = new CordonServer({
    extraArgs: [
      ...registryServeArgs(),
      "--allow-egress-cidr", "127.0.0.0/8",
      "--egress-resolver", `127.0.0.1:${dns.address().port}`,
      "--egress-any-port",
      "--egress-ca", upstream.ca,
    ],
  });
  let client = null;
  let sandboxName = null;
  after(async () => {
    if (sandboxName) await client.deleteSandbox(sandboxName).catch(() => {});
    await server.stop();
    server.cleanup();
    upstream.server.close();
    dns.close();
    rmSync(tmp, { recursive: true, force: true });
  });
  await server.start();
  client = new SandboxClient({ apiEndpoint: `${server.url}/api/v2/sandboxes`, apiKey: server.apiKey });

  const config = sdk.proxyConfig({
    rules: [{
      name: "upstream-token",
      match_hosts: [HOST],
      headers: [{ name: "x-upstream-token", ...sdk.opaqueSecret(SECRET) }],
    }],
  });
  const sb = await client.createSandbox({ name: uniqueName("egress"), timeout: 120, proxyConfig: config });
  sandboxName = sb.name;
  assert.ok(!acyclicJson(await client.getSandbox(sb.name)).includes(SECRET), "the API shows the secret");

  // The host's node and the pinned undici package (as a tar: one upload, not hundreds).
  const work = "/tmp/egress-js";
  const undiciTar = spawnSync("tar", ["-C", dirname(undiciDir()), "-cf", "-", "undici"], { maxBuffer: 64 << 20 });
  assert.equal(undiciTar.status, 0, String(undiciTar.stderr));
  await sb.write(`${work}/node`, readFileSync(NODE));
  await sb.write(`${work}/undici.tar`, undiciTar.stdout);
  await sb.write(`${work}/fetch.cjs`, SCRIPT);
  const setup = await sb.run(`cd ${work} && chmod +x node && tar -xf undici.tar && ./node --version`, { timeout: 60 });
  assert.equal(setup.exit_code, 0, setup.stderr);
  assert.match(setup.stdout, /^v20\./);

  const url = `https://${HOST}:${upstream.port}/from-node?q=1`;
  const result = await sb.run(`cd ${work} && ./node fetch.cjs '${url}'`, { timeout: 90 });
  assert.equal(result.exit_code, 0, result.stderr);
  const out = JSON.parse(result.stdout.trim().split("\n").pop());
  assert.match(out.direct, /^failed/, "node 20's fetch without a proxy-aware dispatcher must not get out");
  assert.equal(out.status, 200);
  assert.equal(out.body, "upstream ok from node\n");
  assert.equal(out.env.HTTPS_PROXY, "http://127.0.0.1:15001");
  assert.ok(out.env.NODE_EXTRA_CA_CERTS, "the proxy CA reaches node");
  assert.ok(!JSON.stringify(out.env).includes(SECRET), "node's process.env holds the secret");
  assert.ok(!result.stdout.includes(SECRET) && !result.stderr.includes(SECRET));

  const seen = upstream.requests.filter((r) => r.path === "/from-node?q=1");
  assert.equal(seen.length, 1, JSON.stringify(upstream.requests));
  assert.equal(seen[0].headers["x-upstream-token"], SECRET);
});
