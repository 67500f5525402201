// Deletes every pool, sandbox and template left in both workspaces (run by run.mjs at the end in
// place of harness/cleanup.mjs: the legacy client has no `langsmith/sandbox`; pools go first, as
// their warm sandboxes outlive `cordon serve` too).
import { SandboxClient } from "langsmith/experimental/sandbox";

for (const apiKey of [process.env.LANGSMITH_API_KEY, process.env.CORDON_OTHER_API_KEY]) {
  const c = new SandboxClient({ apiKey });
  for (const [kind, list, del] of [["pool", "listPools", "deletePool"], ["sandbox", "listSandboxes", "deleteSandbox"], ["template", "listTemplates", "deleteTemplate"]]) {
    try {
      for (const item of await c[list]()) {
        try {
          await c[del](item.name);
          console.log(`deleted leftover ${kind} '${item.name}'`);
        } catch (e) {
          console.log(`could not delete leftover ${kind} '${item.name}': ${e}`);
        }
      }
    } catch (e) {
      console.log(`could not list ${kind}s for cleanup: ${e}`);
    }
  }
}
