// Deletes every sandbox left in both workspaces (run by run.mjs at the end; prints what it did).
import { SandboxClient } from "langsmith/sandbox";

for (const apiKey of [process.env.LANGSMITH_API_KEY, process.env.CORDON_OTHER_API_KEY]) {
  const c = new SandboxClient({ apiKey });
  try {
    for (const sb of await c.listSandboxes()) {
      try {
        await c.deleteSandbox(sb.name);
        console.log(`deleted leftover sandbox '${sb.name}'`);
      } catch (e) {
        console.log(`could not delete leftover sandbox '${sb.name}': ${e}`);
      }
    }
  } catch (e) {
    console.log(`could not list sandboxes for cleanup: ${e}`);
  }
}
