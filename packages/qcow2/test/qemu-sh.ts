/**
 * QEMU's tools run as a test's setup steps: any failure throws with the tool's output, so
 * a broken setup never passes for a result.
 */
import { tool } from "./twins.js";

/** Runs `cmd args` in `cwd`; throws with its stderr and stdout unless it exits 0; gives its stdout. */
export function sh(cmd: string, args: readonly string[], cwd: string): string {
  const r = tool(cmd, args, cwd);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/**
 * `qemu-img create -q -f qcow2 [-o options] [-b backing.file -F backing.format] file size`,
 * run in `cwd` (so relative names resolve there).
 */
export function createQcow2In(
  cwd: string,
  file: string,
  size: string,
  options?: string,
  backing?: { readonly file: string; readonly format: string },
): void {
  const o = options === undefined ? [] : ["-o", options];
  const b = backing === undefined ? [] : ["-b", backing.file, "-F", backing.format];
  sh("qemu-img", ["create", "-q", "-f", "qcow2", ...o, ...b, file, size], cwd);
}
