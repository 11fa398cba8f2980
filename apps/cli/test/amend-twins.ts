/**
 * Shared pieces of the `qimg amend` interop tests: a scratch directory per case, and twin
 * runs of `qemu-img amend` and `qimg amend` compared on exit code, output, first error line,
 * guest bytes, `qemu-img info` facts and a clean `qemu-img check`.
 */
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, expect } from "vitest";
import { qemuImg, qemuInfo } from "./qemu.js";
import { qimg } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "qimg-amend-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let dirs = 0;
/** A new empty directory for one case (all removed after the test file). */
export function freshDir(): string {
  const d = join(tmp, `t${dirs++}`);
  mkdirSync(d);
  return d;
}

/** The first line of stderr without the program's prefix. */
export function firstError(stderr: string): string {
  const line = stderr.split("\n").find((l) => !l.startsWith("WARNING") && !l.startsWith(" ")) ?? "";
  return line.replace(/^(qemu-img|qimg): /, "");
}

/** The facts amend changes, as qemu-img info shows them. */
export function facts(file: string, cwd: string): Record<string, unknown> {
  const j = qemuInfo(file, "qcow2", cwd);
  const spec = (j["format-specific"] as { data: Record<string, unknown> } | undefined)?.data ?? {};
  return {
    "virtual-size": j["virtual-size"],
    "backing-filename": j["backing-filename"],
    "backing-filename-format": j["backing-filename-format"],
    compat: spec["compat"],
    "refcount-bits": spec["refcount-bits"],
    "lazy-refcounts": spec["lazy-refcounts"],
    "compression-type": spec["compression-type"],
    "data-file": spec["data-file"],
    "data-file-raw": spec["data-file-raw"],
    snapshots: ((j["snapshots"] as { name: string }[] | undefined) ?? []).map((s) => s.name),
  };
}

/** `qemu-img check` finds nothing (no errors, no leaks). */
export function expectClean(file: string, cwd: string, what: string): void {
  const r = qemuImg(["check", "--output=json", file], cwd);
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  expect(j["leaks"] ?? 0, what).toBe(0);
}

/** `qemu-img create -q -f qcow2 [-o OPTIONS] [EXTRA…] FILE SIZE` in `dir`; it must succeed. */
export function createQcow2(
  dir: string,
  file: string,
  size: number | string,
  options?: string,
  extra: readonly string[] = [],
): void {
  const args = ["create", "-q", "-f", "qcow2", ...(options ? ["-o", options] : []), ...extra];
  const r = qemuImg([...args, file, String(size)], dir);
  expect(r.code, `qemu-img ${args.join(" ")} ${file} ${size}: ${r.stderr}`).toBe(0);
}

/** One side of a twin pair: an image `file` in the directory `dir`. */
export interface TwinImage {
  readonly dir: string;
  readonly file: string;
}

/**
 * Run `amend ARGS` with qemu-img on `q` and with qimg on `d` (twins, each run in its own
 * directory): the same exit code, stdout and first error line; a refusal leaves `d`
 * byte-identical; a success gives the same `qemu-img info` facts and a clean `qemu-img check`.
 * Returns qemu-img's exit code (the caller compares guest bytes after a success).
 */
export async function amendBoth(
  q: TwinImage,
  d: TwinImage,
  args: readonly string[],
  what: string,
): Promise<number> {
  const before = readFileSync(join(d.dir, d.file));
  const a = qemuImg(["amend", ...args, q.file], q.dir);
  const b = await qimg(["amend", ...args, d.file], d.dir);
  expect(b.code, `${what}\nqemu: ${a.stderr}\nqimg: ${b.stderr}`).toBe(a.code);
  expect(b.stdout, what).toBe(a.stdout);
  expect(firstError(b.stderr), what).toBe(firstError(a.stderr));
  if (a.code !== 0) {
    expect(readFileSync(join(d.dir, d.file)).equals(before), `${what}: refused but changed`).toBe(
      true,
    );
    return a.code;
  }
  expect(facts(d.file, d.dir), what).toEqual(facts(q.file, q.dir));
  expectClean(d.file, d.dir, what);
  return 0;
}

/** Run `amend ARGS` with qemu-img on q.qcow2 and with qimg on d.qcow2 (twins); compare. */
export async function twin(dir: string, args: readonly string[], what: string): Promise<number> {
  const code = await amendBoth({ dir, file: "q.qcow2" }, { dir, file: "d.qcow2" }, args, what);
  if (code !== 0) return code;
  const cmp = qemuImg(["compare", "q.qcow2", "d.qcow2"], dir);
  expect(cmp.code, `${what}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
  return 0;
}
