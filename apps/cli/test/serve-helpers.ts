/**
 * Running `qimg serve` as a real process for the NBD interop tests, and whether the real
 * NBD clients (qemu-img, qemu-io, qemu-nbd, nbdinfo, nbdcopy) are installed. Tests skip with
 * a printed reason when one is missing, unless QIMG_REQUIRE_NBD=1 (CI).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll } from "vitest";
import { CLI_DIR } from "./helpers.js";

const TOOLS = ["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"] as const;

function missingTools(): string[] {
  return TOOLS.filter((t) => {
    const r = spawnSync(t, ["--version"], { stdio: "ignore" });
    return r.error !== undefined || r.status !== 0;
  });
}

/** Whether every NBD client is installed; throws when one is missing under QIMG_REQUIRE_NBD=1. */
export function requireNbd(): boolean {
  const missing = missingTools();
  if (missing.length > 0) {
    if (process.env.QIMG_REQUIRE_NBD === "1") {
      throw new Error(
        `${missing.join(", ")} not on PATH but QIMG_REQUIRE_NBD=1 (install qemu-utils, libnbd-bin)`,
      );
    }
    console.warn(`NBD interop tests skipped: ${missing.join(", ")} not on PATH`);
    return false;
  }
  return true;
}

const MAIN = join(CLI_DIR, "src", "main.ts");
const TSX = pathToFileURL(createRequire(join(CLI_DIR, "package.json")).resolve("tsx")).href;

/** A running `qimg serve` (or qemu-nbd) process. */
export interface Served {
  readonly proc: ChildProcess;
  /** Its stderr so far. */
  stderr(): string;
  /** Resolves with the exit code (or 128 + signal number) once it has exited. */
  readonly exited: Promise<number>;
  /** Send `signal` (default SIGTERM) and wait for the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number>;
}

/** A free TCP port on 127.0.0.1. */
export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

async function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = connect(port, "127.0.0.1");
    c.once("connect", () => {
      c.destroy();
      resolve(true);
    });
    c.once("error", () => resolve(false));
  });
}

function watch(proc: ChildProcess): Served {
  let err = "";
  proc.stderr?.on("data", (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number>((resolve) => {
    proc.once("exit", (code, signal) => resolve(code ?? 128 + (signal === "SIGKILL" ? 9 : 15)));
  });
  return {
    proc,
    stderr: () => err,
    exited,
    stop: async (signal: NodeJS.Signals = "SIGTERM") => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}

/**
 * Start a server process with `args` and wait until it listens: on `socket` (a path) when
 * given, else on TCP `port`. A TCP probe connection would count as a client, so TCP tests
 * pass `-t` or `-e` large enough, or probe with `ready: "none"`.
 */
async function startAndWait(
  command: string,
  args: readonly string[],
  where: { socket?: string; port?: number },
): Promise<Served> {
  const proc = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
  const served = watch(proc);
  for (let i = 0; i < 600; i++) {
    if (proc.exitCode !== null)
      throw new Error(`server exited ${proc.exitCode}: ${served.stderr()}`);
    if (where.socket !== undefined ? existsSync(where.socket) : await canConnect(where.port!))
      return served;
    await new Promise((r) => setTimeout(r, 50));
  }
  await served.stop("SIGKILL");
  throw new Error(`server did not listen within 30 s: ${served.stderr()}`);
}

/** Start `qimg serve ARGS` from source; resolves once it listens. */
export function startServe(
  args: readonly string[],
  where: { socket?: string; port?: number },
): Promise<Served> {
  return startAndWait(
    process.execPath,
    ["--conditions=@qimg/source", "--import", TSX, MAIN, "serve", ...args],
    where,
  );
}

/** Start `qemu-nbd ARGS`; resolves once it listens. */
export function startQemuNbd(
  args: readonly string[],
  where: { socket?: string; port?: number },
): Promise<Served> {
  return startAndWait("qemu-nbd", args, where);
}

/** A test file's scratch directory and the servers its tests start. */
export interface ServeScratch {
  /** The directory (made before the first test). */
  readonly dir: string;
  /** Start `qimg serve -k SOCKET ARGS`, killed after the tests if still running. */
  serveOn(args: readonly string[], socket: string): Promise<Served>;
  /** Have a server started otherwise killed after the tests if still running; returns it. */
  track(server: Served): Served;
}

/**
 * Make a scratch directory named `prefix`… before a test file's tests; after them, kill
 * every server it still runs (SIGKILL) and remove the directory. Call at the top of the file.
 */
export function serveScratch(prefix: string): ServeScratch {
  let dir = "";
  const running: Served[] = [];
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), prefix));
  });
  afterAll(async () => {
    await Promise.all(running.map((s) => s.stop("SIGKILL")));
    rmSync(dir, { recursive: true, force: true });
  });
  const track = (server: Served): Served => {
    running.push(server);
    return server;
  };
  return {
    get dir() {
      return dir;
    },
    serveOn: async (args, socket) => track(await startServe(["-k", socket, ...args], { socket })),
    track,
  };
}

/** The URI of a Unix-socket export. */
export const unixUri = (socket: string, name = ""): string =>
  `nbd+unix:///${name}?socket=${socket}`;

/** Run a tool synchronously (the server is another process). */
export function tool(
  cmd: string,
  args: readonly string[],
): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, {
    encoding: "utf8",
    env: { ...process.env, LC_ALL: "C" },
    maxBuffer: 64 << 20,
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Run a tool asynchronously (several clients at once). */
export function toolAsync(
  cmd: string,
  args: readonly string[],
): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    p.stderr.on("data", (b: Buffer) => (err += b.toString()));
    p.once("exit", (code) => resolve({ code: code ?? -1, stderr: err }));
  });
}

/** `nbdinfo --map --json` as [offset, length, type] triples. */
export function nbdMap(uri: string, context?: string): [number, number, number][] {
  const r = tool("nbdinfo", ["--json", context === undefined ? "--map" : `--map=${context}`, uri]);
  if (r.code !== 0) throw new Error(`nbdinfo --map: ${r.stderr}`);
  return (JSON.parse(r.stdout) as { offset: number; length: number; type: number }[]).map((e) => [
    e.offset,
    e.length,
    e.type,
  ]);
}
