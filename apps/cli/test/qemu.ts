/**
 * Running the real qemu-img / qemu-io in interop tests, and whether they are installed.
 * Tests skip with a printed reason when qemu-img is missing, unless QIMG_REQUIRE_QEMU=1.
 */
import { spawnSync } from "node:child_process";
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
