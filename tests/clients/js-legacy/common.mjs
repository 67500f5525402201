// Helpers for the legacy (template-era, spec §2.8) JS client tests: langsmith 0.5.5's
// `langsmith/experimental/sandbox`. They run under ../js/harness/run.mjs (CORDON_JS_TESTS=this
// directory), which started `cordon serve` and set LANGSMITH_ENDPOINT / LANGSMITH_API_KEY /
// CORDON_OTHER_API_KEY / CORDON_URL.
import { after } from "node:test";
import { randomBytes } from "node:crypto";
import * as sandboxModule from "langsmith/experimental/sandbox";

export const sdk = sandboxModule;
export const READY_TIMEOUT = 120;

export function uniqueName(prefix = "jslegacy") {
  return `${prefix}-${randomBytes(5).toString("hex")}`;
}
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The legacy client configured only through the environment, as a user's would be. */
export const client = () => new sdk.SandboxClient();
export const otherClient = () => new sdk.SandboxClient({ apiKey: process.env.CORDON_OTHER_API_KEY });

// What a test file created, deleted when it ends: pools, then sandboxes, then templates.
const created = [];
after(async () => {
  const order = { pool: 0, sandbox: 1, template: 2 };
  created.sort((a, b) => order[a[1]] - order[b[1]]);
  for (const [c, kind, name] of created.splice(0)) {
    const del = { pool: "deletePool", sandbox: "deleteSandbox", template: "deleteTemplate" }[kind];
    try { await c[del](name); } catch { /* already gone; leftovers are swept by cleanup.mjs */ }
  }
});
export function track(c, kind, name) {
  created.push([c, kind, name]);
}

export async function makeTemplate(c, options = {}) {
  const name = uniqueName("tmpl");
  const t = await c.createTemplate(name, { image: "system/default", cpu: "500m", memory: "256Mi", ...options });
  track(c, "template", name);
  return t;
}

export async function makePool(c, templateName, replicas) {
  const name = uniqueName("pool");
  const p = await c.createPool(name, { templateName, replicas, timeout: READY_TIMEOUT });
  track(c, "pool", name);
  return p;
}

/** `GET /pools/{name}` directly: the extension counters (ready, claimed, starting). */
export async function poolCounts(name, apiKey = process.env.LANGSMITH_API_KEY) {
  const resp = await fetch(`${process.env.CORDON_URL}/api/v2/sandboxes/pools/${name}`, { headers: { "X-Api-Key": apiKey } });
  const body = await resp.json();
  if (resp.status !== 200) throw new Error(`GET /pools/${name} -> ${resp.status}: ${JSON.stringify(body)}`);
  for (const k of ["ready", "claimed", "starting"]) {
    if (!Number.isInteger(body[k])) throw new Error(`GET /pools/${name} lacks the integer counter ${k}: ${JSON.stringify(body)}`);
  }
  return body;
}

export async function waitPool(name, predicate, timeoutMs = READY_TIMEOUT * 1000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const body = await poolCounts(name);
    if (predicate(body)) return body;
    if (Date.now() > deadline) throw new Error(`pool ${name} never reached the wanted state: ${JSON.stringify(body)}`);
    await sleep(250);
  }
}
