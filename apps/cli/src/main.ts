/**
 * The CLI bundle's entry (dist/cli.cjs, loaded by the `qimg` executable, ./bin.ts). Runs the
 * command and exits as soon as it is done.
 */
import { runCli } from "./cli.js";
import { processContext } from "./context.js";

async function main(): Promise<void> {
  const used = { stdout: false, stderr: false };
  const code = await runCli(process.argv.slice(2), processContext(used));
  // Exit at once rather than letting Node tear down its heap and thread pool (10-20 ms after
  // a large copy). Everything the command does is awaited by now; only output still queued
  // for a slow stdout or stderr (asynchronous pipes on some platforms) is waited for.
  const drained = (s: NodeJS.WriteStream): Promise<void> =>
    s.writableLength === 0 ? Promise.resolve() : new Promise((r) => s.once("drain", () => r()));
  await Promise.all([
    used.stdout ? drained(process.stdout) : undefined,
    used.stderr ? drained(process.stderr) : undefined,
  ]);
  process.exit(code);
}

void main();
