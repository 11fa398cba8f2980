/**
 * Shared steps of the iotest ports (iotest-NNN.test.ts): build an image with the real
 * qemu-img/qemu-io, damage it by poking bytes, then check twins of it with qemu-img and with
 * @qimg/check and compare the verdicts (and, after a repair, both repaired images).
 */
import { spawnSync } from "node:child_process";
import { closeSync, copyFileSync, mkdtempSync, openSync, readFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { expect } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { QimgError } from "@qimg/structs";
import { checkImage, formatCheckHuman, formatCheckJson } from "../src/index.js";
import type { CheckResult, RepairMode } from "../src/index.js";
import { qemuCheck, qemuToRaw } from "./helpers.js";

/** A fresh scratch directory for one scenario. */
export function scratch(tag: string): string {
  return mkdtempSync(join(tmpdir(), `qimg-iotest-${tag}-`));
}

/** Run a qemu tool; throws with its stderr when it fails (unless `allowFail`). */
export function run(
  cmd: "qemu-img" | "qemu-io",
  args: readonly string[],
  allowFail = false,
): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  const out = { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  if (!allowFail && out.status !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${out.status}): ${out.stderr}`);
  }
  return out;
}

/** `qemu-img create -f qcow2 [-o opts] file size`. */
export function create(file: string, size: number, opts = ""): void {
  run("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    ...(opts ? ["-o", opts] : []),
    file,
    String(size),
  ]);
}

/** qemu-io commands on a qcow2 image. */
export function qemuIo(file: string, ...cmds: string[]): void {
  run("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file]);
}

/** Write bytes at a file offset (poke_file). */
export function poke(file: string, offset: number, bytes: readonly number[]): void {
  const fd = openSync(file, "r+");
  try {
    writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** A big-endian u64 as 8 bytes. */
export function be64(v: bigint): number[] {
  const out: number[] = [];
  for (let i = 7; i >= 0; i--) out.push(Number((v >> BigInt(i * 8)) & 0xffn));
  return out;
}

/** Read a big-endian integer of `n` bytes (peek_file_be). */
export function peek(file: string, offset: number, n: number): number {
  const b = readFileSync(file).subarray(offset, offset + n);
  let v = 0;
  for (const x of b) v = v * 256 + x;
  return v;
}

/** Our check of `path` (repairing with `mode`); a typed error when it cannot be checked. */
export async function ourCheck(path: string, mode?: RepairMode): Promise<CheckResult | QimgError> {
  const backend = await FileBackend.open(path, { readOnly: mode === undefined });
  try {
    return await checkImage(backend, "qcow2", { repair: mode, filename: basename(path) });
  } catch (e) {
    if (e instanceof QimgError) return e;
    throw e;
  } finally {
    await backend.close();
  }
}

/** Two copies of `path` beside it: one for qemu-img, one for us. */
export function twins(path: string): { q: string; ours: string } {
  // Same base name in two directories, so both report the same `filename`.
  const q = join(mkdtempSync(join(dirname(path), "q-")), basename(path));
  const ours = join(mkdtempSync(join(dirname(path), "ours-")), basename(path));
  copyFileSync(path, q);
  copyFileSync(path, ours);
  return { q, ours };
}

/** qemu-img check's stderr without its "qemu-img: " prefixes on failure lines. */
const unprefixed = (s: string): string => s.replaceAll(/^qemu-img: /gm, "");

/**
 * Read-only check: the human output (stdout and stderr), the JSON and the exit code equal
 * qemu-img check's. Returns our result.
 */
export async function expectSameReadOnly(path: string): Promise<CheckResult> {
  const { q, ours } = twins(path);
  const human = qemuCheck(q);
  const json = qemuCheck(q, "--output=json");
  const r = await ourCheck(ours);
  if (r instanceof QimgError) {
    throw new Error(
      `we refused (${r.code}: ${r.message}); qemu-img said:\n${human.stderr}${human.stdout}`,
    );
  }
  const h = formatCheckHuman(r);
  expect(h.stderr).toBe(unprefixed(human.stderr));
  expect(h.stdout).toBe(human.stdout);
  if (json.stdout !== "") expect(formatCheckJson(r)).toBe(json.stdout);
  expect(r.exitCode).toBe(human.status);
  return r;
}

/**
 * Repair `path` with `mode` on both twins: the same report and exit code, then the same
 * `qemu-img check --output=json` on both repaired images and (unless `dataLost`) the same
 * guest content. Returns our result and the twins' paths.
 */
export async function expectSameRepair(
  path: string,
  mode: RepairMode,
  options: { sameJsonAfter?: boolean } = {},
): Promise<{ r: CheckResult; q: string; ours: string }> {
  const { q, ours } = twins(path);
  const human = qemuCheck(q, "-r", mode);
  const r = await ourCheck(ours, mode);
  if (r instanceof QimgError) {
    throw new Error(
      `we refused (${r.code}: ${r.message}); qemu-img said:\n${human.stderr}${human.stdout}`,
    );
  }
  const h = formatCheckHuman(r);
  expect(h.stderr).toBe(unprefixed(human.stderr));
  const end = (s: string): string => (r.rebuilt ? s.replace(/^Image end offset: \d+\n/m, "") : s);
  expect(end(h.stdout)).toBe(end(human.stdout));
  expect(r.exitCode).toBe(human.status);
  const qa = qemuCheck(q, "--output=json");
  const oa = qemuCheck(ours, "--output=json");
  if (options.sameJsonAfter !== false) {
    // Our rebuilt refcount structures go at the end of the file (crash-safe: the old ones
    // stay intact until the header switches), QEMU's into the first free clusters: after a
    // rebuild only the image end offset may differ.
    const norm = (s: string): string =>
      r.rebuilt ? s.replace(/ *"image-end-offset": \d+,\n/, "") : s;
    expect(norm(oa.stdout)).toBe(norm(qa.stdout));
  }
  expect(oa.status).toBe(qa.status);
  return { r, q, ours };
}

/** The guest content of two images is identical (qemu-img convert to raw). */
export function expectSameGuest(a: string, b: string): void {
  const ra = `${a}.raw`;
  const rb = `${b}.raw`;
  // Both readable (then byte-identical) or both unreadable (qemu-img's reads fail on both).
  const okA = qemuToRaw(a, "qcow2", ra);
  expect(qemuToRaw(b, "qcow2", rb)).toBe(okA);
  if (!okA) return;
  const da = readFileSync(ra);
  const db = readFileSync(rb);
  expect(db.byteLength).toBe(da.byteLength);
  const i = da.findIndex((x, k) => x !== db[k]);
  expect(i, `guest byte ${i}: qemu-img's repair reads ${da[i]}, ours ${db[i]}`).toBe(-1);
}

/** Mark the clusters of [start, end) allocated (refcount 1) in refcount block 0 (16-bit refcounts). */
export function refblock0Allocate(f: string, start: number, end: number): void {
  const cs = 2 ** peek(f, 20, 4);
  const refblock = peek(f, peek(f, 48, 8), 8);
  const fd = openSync(f, "r+");
  try {
    const one = Uint8Array.from([0, 1]);
    for (let c = Math.floor(start / cs); c < Math.ceil(end / cs); c++) {
      writeSync(fd, one, 0, 2, refblock + c * 2);
    }
  } finally {
    closeSync(fd);
  }
}

/**
 * `check -r all` on twins: the same lines, counts and exit code, both repaired images clean
 * and equal as qemu-img check sees them, the same guest data, and `qemu-img snapshot -l`
 * lists the same snapshots on both.
 */
export async function sameRepairAll(f: string): Promise<{ q: string; ours: string }> {
  const { q, ours } = await expectSameRepair(f, "all");
  expect(run("qemu-img", ["check", ours], true).status).toBe(0);
  expect(run("qemu-img", ["check", q], true).status).toBe(0);
  expectSameGuest(q, ours);
  const list = (x: string): string => {
    const r = spawnSync("qemu-img", ["snapshot", "-l", x], {
      encoding: "utf8",
      maxBuffer: 64 * 1024 * 1024,
    });
    expect(r.status, r.stderr).toBe(0);
    return r.stdout;
  };
  expect(list(ours)).toBe(list(q));
  expect(peek(ours, 60, 4)).toBe(peek(q, 60, 4));
  return { q, ours };
}

/** A 40-byte snapshot table entry: 1 KiB of extra data, a 65535-byte ID and name (all zeros). */
export const BIG_ENTRY = 40 + 1024 + 65535 + 65535 + 2;
export function writeBigEntries(f: string, at: number, n: number): void {
  const fixed = new Uint8Array(40);
  const dv = new DataView(fixed.buffer);
  dv.setUint16(12, 0xffff);
  dv.setUint16(14, 0xffff);
  dv.setUint32(36, 1024);
  const fd = openSync(f, "r+");
  try {
    for (let i = 0; i < n; i++) writeSync(fd, fixed, 0, 40, at + i * BIG_ENTRY);
  } finally {
    closeSync(fd);
  }
}
