// Shared helpers for the JS client test files (they run under harness/run.mjs, which started
// `cordon serve` and set LANGSMITH_ENDPOINT / LANGSMITH_API_KEY / CORDON_OTHER_API_KEY).
import { after } from "node:test";
import { randomBytes } from "node:crypto";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import * as sandboxModule from "langsmith/sandbox";

export const { SandboxClient } = sandboxModule;
export const sdk = sandboxModule;

const envRequire = createRequire(join(process.env.CORDON_JS_ENV, "package.json"));
/** The pinned langsmith version (e.g. "0.12.0"). */
export const LANGSMITH_VERSION = envRequire("langsmith/package.json").version;

export function uniqueName(prefix = "jscompat") {
  return `${prefix}-${randomBytes(5).toString("hex")}`;
}

export const text = (bytes) => new TextDecoder().decode(bytes);
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The official client configured only through the environment, as a user's would be. */
export function client() {
  return new SandboxClient();
}

/** A client of the second workspace (the server's second --api-key). */
export function otherClient() {
  return new SandboxClient({ apiKey: process.env.CORDON_OTHER_API_KEY });
}

const created = [];
after(async () => {
  for (const [c, name] of created.splice(0)) {
    try { await c.deleteSandbox(name); } catch { /* already gone; leftovers are swept by run.mjs */ }
  }
});

/** Creates a ready sandbox that is deleted when the test file ends. */
export async function makeSandbox(options = {}, c = client()) {
  const name = options.name ?? uniqueName();
  const sb = await c.createSandbox({ timeout: 120, ...options, name });
  created.push([c, sb.name]);
  return sb;
}

/** Creates a ready sandbox from a snapshot (by id: the one form every pinned client sends). */
export async function makeSandboxFrom(snapshotId, options = {}, c = client()) {
  const name = options.name ?? uniqueName();
  const sb = await c.createSandbox(snapshotId, { timeout: 120, ...options, name });
  created.push([c, sb.name]);
  return sb;
}

/** The test registries run.mjs started (their JSON line: `open`, `auth`, `ca_pem`, `username`,
 * `password`, `images`); throws why they are missing. */
export function registries() {
  if (!process.env.CORDON_REGISTRIES) {
    throw new Error(process.env.CORDON_REGISTRIES_ERROR ?? "test-registries not started (run the tests through harness/run.mjs)");
  }
  return JSON.parse(process.env.CORDON_REGISTRIES);
}

/** Records every fetch() the client makes (the JS client's HTTP goes through global fetch). */
export function recordFetches() {
  const calls = [];
  const orig = globalThis.fetch;
  globalThis.fetch = (input, init = {}) => {
    const url = typeof input === "string" ? input : input.url ?? String(input);
    calls.push({ method: (init.method ?? input.method ?? "GET").toUpperCase(), url });
    return orig(input, init);
  };
  return { calls, restore: () => { globalThis.fetch = orig; } };
}

/** Whether the pinned client's sandbox code mentions `needle` (e.g. "run_config": 0.9.0 has no
 * runConfig option and silently drops it). */
export function clientSourceMentions(needle) {
  const dir = dirname(envRequire.resolve("langsmith/sandbox"));
  const candidates = [join(dir, "lib/sandbox"), join(dir, "dist/sandbox")].filter((d) => existsSync(d));
  return candidates.some((d) => readdirSync(d).filter((f) => f.endsWith(".js")).some((f) => readFileSync(join(d, f), "utf8").includes(needle)));
}
export const NO_RUN_CONFIG = !clientSourceMentions("run_config") && `langsmith ${LANGSMITH_VERSION} has no runConfig option (it is dropped client-side, never sent)`;

/** Whether the pinned client has this Sandbox method (0.9.0 lacks stat/readRange/glob/grep/ls). */
export function clientLacks(sandboxProto, ...methods) {
  const missing = methods.filter((m) => typeof sandboxProto[m] !== "function");
  return missing.length ? `langsmith ${LANGSMITH_VERSION} has no Sandbox.${missing.join("/")}()` : false;
}
