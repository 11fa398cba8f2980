/**
 * The CLI bundle's entry (dist/cli.cjs, loaded by the `qimg` executable, ./bin.ts). Runs the
 * command and exits as soon as it is done.
 */
import { runCli } from "./cli.js";
import { processContext } from "./context.js";
import { reportError } from "./errors.js";

/**
 * Output the reader stopped taking (`qimg io -c 'read -v 0 1M' x | head -1`): as qemu-img
 * and qemu-io do (they ignore SIGPIPE and write errors), the command goes on quietly, its
 * further output dropped, and exits with its own status. A write to a closed pipe surfaces
 * as an 'error' event of the stream, which nothing listens to, so it lands here.
 */
const closedPipes = { stdout: false, stderr: false };

process.on("uncaughtException", (e) => {
  if ((e as NodeJS.ErrnoException).code === "EPIPE") {
    // Which stream it was does not matter: both get no more waiting for a drain.
    closedPipes.stdout = true;
    closedPipes.stderr = true;
    return;
  }
  // Anything else is a bug outside a command: one line (a stack trace with --debug), exit 1.
  const debug = process.argv.includes("--debug");
  reportError(e, { ...processContext(), debug }, 1);
  process.exit(1);
});

async function main(): Promise<void> {
  const used = { stdout: false, stderr: false };
  const code = await runCli(process.argv.slice(2), processContext(used));
  // Exit at once rather than letting Node tear down its heap and thread pool (10-20 ms after
  // a large copy). Everything the command does is awaited by now; only output still queued
  // for a slow stdout or stderr (asynchronous pipes on some platforms) is waited for.
  const drained = (s: NodeJS.WriteStream): Promise<void> =>
    s.writableLength === 0 || s.destroyed
      ? Promise.resolve()
      : new Promise((r) => {
          s.once("drain", () => r());
          s.once("close", () => r());
        });
  await Promise.all([
    used.stdout && !closedPipes.stdout ? drained(process.stdout) : undefined,
    used.stderr && !closedPipes.stderr ? drained(process.stderr) : undefined,
  ]);
  process.exit(code);
}

void main();
