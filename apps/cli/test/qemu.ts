/**
 * Running the real qemu-img / qemu-io in interop tests, and whether they are installed.
 * Tests skip with a printed reason when qemu-img is missing, unless QIMG_REQUIRE_QEMU=1.
 */
import { spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { requireQemu } from "@qimg/fixtures";
import { seededRandom } from "@qimg/io";

export const hasQemu = requireQemu();

export interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

function run(tool: string, args: readonly string[], cwd?: string): Run {
  const r = spawnSync(tool, args, { cwd, encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  return { code: r.status ?? (r.signal === null ? -1 : 128), stdout: r.stdout, stderr: r.stderr };
}

export const qemuImg = (args: readonly string[], cwd?: string): Run => run("qemu-img", args, cwd);
export const qemuIo = (args: readonly string[], cwd?: string): Run => run("qemu-io", args, cwd);

/** `qemu-img info --output=json`. */
export function qemuInfo(file: string, format?: string, cwd?: string): Record<string, unknown> {
  const r = qemuImg(["info", "-U", ...(format ? ["-f", format] : []), "--output=json", file], cwd);
  if (r.code !== 0) throw new Error(`qemu-img info ${file}: ${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

export const prng = seededRandom;

/** qemu-img's output with its program name replaced by ours. */
export const withQimgName = (s: string): string => s.replaceAll("qemu-img: ", "qimg: ");

/** Throw with the tool's output unless it exited 0 (`what` names the step). */
export function ok(r: Run, what: string): void {
  if (r.code !== 0) throw new Error(`${what}: exit ${r.code}: ${r.stderr}${r.stdout}`);
}

let holder: ChildProcess | undefined;

/**
 * Start qemu-io holding `file` open (read-write unless `readOnly`) until {@link releaseQemuIo};
 * resolves once its byte-range locks show in /proc/locks (Linux only).
 */
export async function holdWithQemuIo(file: string, readOnly = false): Promise<ChildProcess> {
  releaseQemuIo();
  const args = ["-f", "qcow2", ...(readOnly ? ["-r"] : []), "-c", "sleep 120000", file];
  const c = spawn("qemu-io", args, { stdio: "ignore" });
  holder = c;
  const ino = spawnSync("stat", ["-c", "%i", file], { encoding: "utf8" }).stdout.trim();
  for (let i = 0; i < 200; i++) {
    if (readFileSync("/proc/locks", "latin1").includes(`:${ino} 100 `)) return c;
    if (c.exitCode !== null) throw new Error(`qemu-io exited with ${c.exitCode}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error("qemu-io took no lock within 5 s");
}

/** Kill the qemu-io that {@link holdWithQemuIo} started, if it still runs (for afterEach). */
export function releaseQemuIo(): void {
  if (holder?.exitCode === null) holder.kill("SIGKILL");
  holder = undefined;
}
