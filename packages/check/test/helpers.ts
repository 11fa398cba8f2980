import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { basename, dirname } from "node:path";
import { requireQemu } from "@qimg/fixtures";
import { seededRandom } from "@qimg/io";

/** Whether interop tests can run; prints why not once (fails under QIMG_REQUIRE_QEMU=1). */
export function haveQemu(): boolean {
  const ok = requireQemu();
  if (!ok && !warned) {
    warned = true;
    console.warn(
      "skipping qemu-img interop tests: qemu-img is not on PATH (set QIMG_REQUIRE_QEMU=1 to fail instead)",
    );
  }
  return ok;
}
let warned = false;

/** `qemu-img check [args] file`: exit code, stdout, stderr. */
export function qemuCheck(
  file: string,
  ...args: string[]
): { status: number; stdout: string; stderr: string } {
  // Run beside the image so relative backing / data file names resolve.
  const r = spawnSync("qemu-img", ["check", ...args, basename(file)], {
    encoding: "utf8",
    cwd: dirname(file),
  });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** `qemu-img convert -O raw` of an image into `out`; false when qemu-img fails. */
export function qemuToRaw(file: string, format: string, out: string): boolean {
  const r = spawnSync("qemu-img", ["convert", "-f", format, "-O", "raw", basename(file), out], {
    encoding: "utf8",
    cwd: dirname(file),
  });
  return r.status === 0;
}

export const sha256 = (path: string): string =>
  createHash("sha256").update(readFileSync(path)).digest("hex");

export const prng = seededRandom;
