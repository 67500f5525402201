// The JS official-client suite runner: one fresh `cordon serve` per run, then `node --test`.
//
//   node tests/clients/js/harness/run.mjs ENV_DIR [extra node --test args...]
//
// ENV_DIR is an installed pinned set (tests/clients/js/npm-env.sh). Like the Python conftest: a
// free loopback port, a temporary data dir, two random API keys (two workspaces; --api-key is
// repeatable); the client finds the server the way a user's would, through
// LANGSMITH_ENDPOINT=http://127.0.0.1:PORT/api and LANGSMITH_API_KEY (CORDON_OTHER_API_KEY is the
// second workspace's key). Two passes against the same server:
//   1. test/*.test.mjs with the pinned set as installed (`ws` present: run() uses WebSocket);
//   2. test/no-ws/*.test.mjs with `ws` hidden (CORDON_JS_NO_WS=1): run() falls back to HTTP
//      POST /execute, as for a user who did not install the optional peer.
// At the end it deletes leftover sandboxes in both workspaces, stops the server (SIGTERM, then
// SIGKILL after 15 s) and removes its data dir; on failure (or CORDON_SHOW_LOG=1) it prints the
// server log tail.
//
// Before the server it starts the test registries (harness/server.mjs `Registries`) and gives the
// server `--insecure-registry` / `--registry-ca` for them; the tests get their JSON line as
// CORDON_REGISTRIES (or, when they could not start, the reason as CORDON_REGISTRIES_ERROR, so only
// the tests that need them fail).
//
// CORDON_JS_TESTS names another directory holding the test/ (and test/no-ws/) files to run, e.g.
// tests/clients/js-legacy for the template-era client that lacks the current API; a pass without
// files is skipped, and that directory's cleanup.mjs, when it has one, replaces harness/cleanup.mjs.
//
// Environment: CORDON_BIN, CORDON_START_TIMEOUT (s, default 180), CORDON_KEEP_DATA=1,
// CORDON_SHOW_LOG=1, CORDON_JS_CONCURRENCY (test files run at once, default 2),
// CORDON_TEST_REGISTRIES_BIN, CORDON_REGISTRIES_TIMEOUT (s, default 180).
import { spawn } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { CordonServer, Registries, cleanEnv, registryServeArgs } from "./server.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const JS_DIR = resolve(HERE, "..");
const TESTS_DIR = resolve(process.env.CORDON_JS_TESTS ?? JS_DIR);

const [envArg, ...extraArgs] = process.argv.slice(2);
if (!envArg) {
  console.error("usage: run.mjs ENV_DIR [node --test args...]");
  process.exit(2);
}
const envDir = resolve(envArg);

let registries = null;
let registriesError = null;
try {
  registries = new Registries();
  await registries.start();
} catch (e) {
  registriesError = `could not start test-registries: ${e.message}`;
  console.error(registriesError);
  registries?.cleanup();
  registries = null;
}

async function stopRegistries() {
  if (!registries) return;
  const code = await registries.stop();
  if (code !== 0) console.log(`test-registries exited with ${code}\n${registries.logTail()}`);
  const note = registries.cleanup();
  if (note) console.log(note);
}

let server;
try {
  server = new CordonServer({ extraArgs: registryServeArgs(registries?.info) });
  await server.start();
} catch (e) {
  console.error(`could not start cordon serve: ${e.message}`);
  server?.cleanup();
  await stopRegistries();
  process.exit(3);
}

const testEnv = {
  ...cleanEnv(),
  CORDON_JS_ENV: envDir,
  CORDON_URL: server.url,
  CORDON_LOG_PATH: server.logPath,
  LANGSMITH_ENDPOINT: server.endpoint,
  LANGSMITH_API_KEY: server.apiKey,
  CORDON_OTHER_API_KEY: server.otherApiKey,
  ...(registries ? { CORDON_REGISTRIES: JSON.stringify(registries.info) } : { CORDON_REGISTRIES_ERROR: registriesError }),
};
const register = join(HERE, "register.mjs");
const concurrency = process.env.CORDON_JS_CONCURRENCY ?? "2";

function nodeTest(files, extraEnv) {
  return new Promise((res) => {
    const child = spawn(process.execPath, [
      "--import", register, "--test", `--test-concurrency=${concurrency}`,
      "--test-reporter=spec", "--test-timeout=180000", ...extraArgs, ...files,
    ], { cwd: TESTS_DIR, stdio: "inherit", env: { ...testEnv, ...extraEnv } });
    child.on("exit", (code, signal) => res(code ?? (signal ? 1 : 0)));
  });
}

const listTests = (sub) => !existsSync(join(TESTS_DIR, sub)) ? [] : readdirSync(join(TESTS_DIR, sub)).filter((f) => f.endsWith(".test.mjs")).sort().map((f) => join(sub, f));
const passes = [
  { label: "ws installed: WebSocket exec", files: listTests("test"), env: {} },
  { label: "ws hidden: HTTP /execute fallback", files: listTests("test/no-ws"), env: { CORDON_JS_NO_WS: "1" } },
];
let status = 0;
for (const p of passes) {
  if (p.files.length === 0) continue;
  console.log(`--- node --test (${p.label}): ${p.files.length} files`);
  const rc = await nodeTest(p.files, p.env);
  if (rc !== 0) status = rc;
  if (!server.alive()) {
    console.error(`cordon serve died (exit ${server.exit}) during the pass "${p.label}"`);
    status = status || 1;
    break;
  }
}

// Leftover sandboxes (they outlive `cordon serve`): delete them, best effort, reported.
if (server.alive()) {
  const notes = await new Promise((res) => {
    const ownCleanup = join(TESTS_DIR, "cleanup.mjs");
    const cleanup = existsSync(ownCleanup) ? ownCleanup : join(HERE, "cleanup.mjs");
    const child = spawn(process.execPath, ["--import", register, cleanup], {
      cwd: TESTS_DIR, stdio: ["ignore", "pipe", "inherit"], env: testEnv,
    });
    let out = "";
    child.stdout.on("data", (d) => { out += d; });
    child.on("exit", () => res(out.trim()));
  });
  if (notes) console.log(notes);
}
const code = await server.stop();
console.log(`cordon serve: ${server.binary}, ready after ${server.startedIn.toFixed(2)}s, exit ${code} on SIGTERM`);
if (code !== 0 && code !== "SIGTERM") {
  console.log(`note: cordon serve exited with ${code} on SIGTERM`);
}
if (status !== 0 || process.env.CORDON_SHOW_LOG === "1") console.log(server.logTail());
const note = server.cleanup({ keepLog: status !== 0 });
if (note) console.log(note);
await stopRegistries();
process.exit(status);
