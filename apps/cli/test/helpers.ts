import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { runCli } from "../src/cli.js";
import { captureContext } from "../src/context.js";

export const CLI_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");
const MAIN = join(CLI_DIR, "src", "main.ts");
const TSX = pathToFileURL(createRequire(join(CLI_DIR, "package.json")).resolve("tsx")).href;

export interface RunResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Run the CLI in this process (fast); `cwd` is entered for the duration. */
export async function qimg(args: readonly string[], cwd?: string): Promise<RunResult> {
  const ctx = captureContext();
  const before = process.cwd();
  if (cwd !== undefined) process.chdir(cwd);
  try {
    const code = await runCli(args, ctx);
    return { code, stdout: ctx.out.stdout, stderr: ctx.out.stderr };
  } finally {
    process.chdir(before);
  }
}

/** Run the CLI as a real process from source (node --import tsx src/main.ts). */
export function qimgProcess(args: readonly string[], cwd?: string): RunResult {
  const r = spawnSync(
    process.execPath,
    ["--conditions=@qimg/source", "--import", TSX, MAIN, ...args],
    {
      cwd: cwd ?? CLI_DIR,
      encoding: "utf8",
    },
  );
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}
