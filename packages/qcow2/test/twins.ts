/**
 * Twin images for write-path tests: the same operations through real qemu-io on one image and
 * through the qcow2 driver on its copy, then guest bytes (`qemu-img compare`), verdicts
 * (`qemu-img check --output=json`) and layout (`qemu-img map`) side by side.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { RawImage } from "@qimg/io";
import type { BackingOpener } from "@qimg/io";
import { openQcow2 } from "../src/index.js";
import type { Qcow2Image, Qcow2OpenOptions } from "../src/index.js";
import { prng } from "./prng.js";

/**
 * A scratch directory for this test file (removed after it), and a function that makes a new
 * empty subdirectory in it for each case.
 */
export function scratchDirs(prefix: string): () => string {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
  let dirs = 0;
  return () => {
    const d = path.join(tmp, `t${dirs++}`);
    fs.mkdirSync(d);
    return d;
  };
}

export type Op =
  | { readonly k: "write"; readonly off: number; readonly len: number; readonly seed: number }
  | { readonly k: "zero"; readonly off: number; readonly len: number; readonly unmap: boolean }
  | { readonly k: "discard"; readonly off: number; readonly len: number }
  /** Compressed write of whole clusters (the last one may end at the disk's end). */
  | {
      readonly k: "compressed";
      readonly off: number;
      readonly len: number;
      readonly seed: number;
      /** Text only: compresses to a small fraction (many clusters share a host cluster). */
      readonly text?: boolean;
    }
  | { readonly k: "flush" };

export interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export function tool(cmd: string, args: readonly string[], cwd?: string): Run {
  const r = spawnSync(cmd, args, { cwd, encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export function qemuImg(args: readonly string[], cwd?: string): Run {
  return tool("qemu-img", args, cwd);
}

/** Data for a write: half compressible (text-like runs), half random, from a seed. */
export function dataOf(seed: number, len: number, text = false): Uint8Array {
  const r = prng(seed);
  const b = new Uint8Array(len);
  let i = 0;
  while (i < len) {
    const run = Math.min(len - i, 1 + Math.floor(r() * 700));
    if (text || r() < 0.5) {
      const words = "qcow2 cluster refcount table guest host ";
      for (let k = 0; k < run; k++) b[i + k] = words.charCodeAt((i + k) % words.length);
    } else {
      for (let k = 0; k < run; k++) b[i + k] = Math.floor(r() * 256);
    }
    i += run;
  }
  return b;
}

/** The qemu-io command for an op (data files for -s are written into `dir`). */
function qemuIoCmd(op: Op, dir: string, n: number): string {
  switch (op.k) {
    case "write":
    case "compressed": {
      const src = path.join(dir, `op${n}.bin`);
      fs.writeFileSync(src, dataOf(op.seed, op.len, op.k === "compressed" && op.text === true));
      return `write ${op.k === "compressed" ? "-c " : ""}-s ${src} ${op.off} ${op.len}`;
    }
    case "zero":
      return `write -z ${op.unmap ? "-u " : ""}${op.off} ${op.len}`;
    case "discard":
      return `discard ${op.off} ${op.len}`;
    case "flush":
      return "flush";
  }
}

/**
 * Run ops through qemu-io in one process (as one open, like the driver's).
 *
 * A compressed write of several clusters is given to qemu-io one cluster at a time: QEMU 7.2
 * compresses the clusters of one request in parallel tasks, and on 512-byte clusters those
 * tasks now and then race into "Preventing invalid write on metadata (overlaps with active L2
 * table)" (seen in about one run in four under load, always on the same sequence). One request
 * per cluster writes the same guest bytes and never races.
 */
export function qemuIoOps(file: string, ops: readonly Op[], dir: string): Run {
  const args: string[] = [];
  const cs = clusterSizeOf(file);
  ops.forEach((op, n) => {
    if (op.k === "compressed" && cs !== undefined && op.len > cs && op.off % cs === 0) {
      const data = dataOf(op.seed, op.len, op.text === true);
      for (let at = 0; at < op.len; at += cs) {
        const src = path.join(dir, `op${n}-${at}.bin`);
        fs.writeFileSync(src, data.subarray(at, Math.min(op.len, at + cs)));
        args.push("-c", `write -c -s ${src} ${op.off + at} ${Math.min(cs, op.len - at)}`);
      }
    } else {
      args.push("-c", qemuIoCmd(op, dir, n));
    }
  });
  return tool("qemu-io", [...args, file], dir);
}

/** The cluster size in a qcow2 file's header, or undefined for anything else. */
function clusterSizeOf(file: string): number | undefined {
  const head = Buffer.alloc(24);
  const fd = fs.openSync(file, "r");
  try {
    if (fs.readSync(fd, head, 0, 24, 0) < 24 || head.readUInt32BE(0) !== 0x514649fb)
      return undefined;
  } finally {
    fs.closeSync(fd);
  }
  return 2 ** head.readUInt32BE(20);
}

/** Opens a backing file or an external data file for the driver (writable data file). */
export const openBacking: BackingOpener = async (req) => {
  const file = path.resolve(path.dirname(req.relativeTo), req.filename);
  const backend = await FileBackend.open(file, { readOnly: true });
  if (req.format === "qcow2") return openQcow2(backend, { openBacking, openDataFile });
  return RawImage.open(backend);
};

export const openDataFile = (name: string, relativeTo: string): Promise<FileBackend> =>
  FileBackend.open(path.resolve(path.dirname(relativeTo), name), {});

export async function openRw(file: string, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
  return openQcow2(await FileBackend.open(file, {}), {
    readOnly: false,
    openBacking,
    openDataFile,
    ...options,
  });
}

/** Apply ops through the driver; returns the first error (the image is closed either way). */
export async function driverOps(file: string, ops: readonly Op[]): Promise<unknown> {
  let image: Qcow2Image;
  try {
    image = await openRw(file);
  } catch (e) {
    return e;
  }
  let failure: unknown;
  try {
    for (const op of ops) {
      switch (op.k) {
        case "write":
          await image.write(op.off, dataOf(op.seed, op.len));
          break;
        case "compressed": {
          const data = dataOf(op.seed, op.len, op.text === true);
          const cs = image.clusterSize;
          for (let p = 0; p < op.len; p += cs) {
            await image.writeCompressed(op.off + p, data.subarray(p, Math.min(op.len, p + cs)));
          }
          break;
        }
        case "zero":
          await image.writeZeroes(op.off, op.len, { mayUnmap: op.unmap });
          break;
        case "discard":
          await image.discard(op.off, op.len);
          break;
        case "flush":
          await image.flush();
          break;
      }
    }
  } catch (e) {
    failure = e;
  } finally {
    await image.close().catch((e: unknown) => (failure ??= e));
  }
  return failure;
}

export interface CheckVerdict {
  readonly code: number;
  readonly corruptions: number;
  readonly leaks: number;
  readonly checkErrors: number;
  readonly raw: string;
}

/** `qemu-img check --output=json` as counts (code 0 clean, 2 corrupt, 3 leaks, 1 failed). */
export function qemuCheck(file: string): CheckVerdict {
  const r = qemuImg(["check", "--output=json", file], path.dirname(file));
  let j: Record<string, unknown> = {};
  try {
    j = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    // check could not run at all
  }
  return {
    code: r.code,
    corruptions: Number(j.corruptions ?? 0),
    leaks: Number(j.leaks ?? 0),
    checkErrors: Number(j["check-errors"] ?? 0),
    raw: r.stdout + r.stderr,
  };
}

export interface MapEntry {
  readonly start: number;
  readonly length: number;
  readonly data: boolean;
  readonly zero: boolean;
  readonly depth: number;
  readonly offset?: number;
}

export function qemuMap(file: string): MapEntry[] {
  const r = qemuImg(["map", "--output=json", file], path.dirname(file));
  if (r.code !== 0) throw new Error(`qemu-img map ${file}: ${r.stderr}`);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** Guest bytes qemu-img map shows as stored compressed (data without a host offset). */
export function compressedBytes(file: string): number {
  return qemuMap(file)
    .filter((e) => e.data && e.depth === 0 && e.offset === undefined)
    .reduce((n, e) => n + e.length, 0);
}

/** `qemu-img compare` of two images: "" when identical, else qemu-img's message. */
export function compareImages(a: string, b: string): string {
  const r = qemuImg(["compare", a, b], path.dirname(a));
  return r.code === 0 ? "" : `${r.stdout}${r.stderr}`.trim() || `exit ${r.code}`;
}

/** Guest bytes as qemu-img reads them. */
export function qemuRaw(file: string): Uint8Array {
  const out = `${file}.guest.raw`;
  const r = qemuImg(["convert", "-O", "raw", file, out], path.dirname(file));
  if (r.code !== 0) throw new Error(`qemu-img convert ${file}: ${r.stderr}`);
  const b = new Uint8Array(fs.readFileSync(out));
  fs.rmSync(out);
  return b;
}

/** First differing byte of two arrays (-1 when equal). */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/**
 * Random ops over a disk of `size` bytes: offsets and lengths mostly not multiples of 512 or
 * of the cluster, some cluster aligned to reach the whole-cluster paths. Compressed writes go
 * only to clusters no earlier op touched (in `touched` too): QEMU refuses (EIO) compressed
 * writes over allocated clusters.
 */
export function randomOps(
  seed: number,
  size: number,
  cs: number,
  count: number,
  kinds: { compressed?: boolean; touched?: Set<number> } = {},
): Op[] {
  const r = prng(seed);
  const ops: Op[] = [];
  const touched = kinds.touched ?? new Set<number>();
  const clusters = Math.ceil(size / cs);
  const touch = (off: number, len: number): void => {
    for (let c = Math.floor(off / cs); c <= Math.floor((off + len - 1) / cs); c++) touched.add(c);
  };
  let attempts = 0;
  while (ops.length < count && attempts++ < count * 20) {
    const x = r();
    if (kinds.compressed && x < 0.25) {
      const c = Math.floor(r() * clusters);
      let n = 0;
      const want = 1 + Math.floor(r() * 3);
      while (n < want && c + n < clusters && !touched.has(c + n)) n++;
      if (n === 0) continue;
      const off = c * cs;
      const len = Math.min(size - off, n * cs);
      touch(off, len);
      ops.push({ k: "compressed", off, len, seed: Math.floor(r() * 1e9) });
      continue;
    }
    let off = Math.floor(r() * size);
    let len = 1 + Math.floor(r() * (r() < 0.3 ? cs * 5 : 9000));
    if (r() < 0.35) {
      off = Math.floor(off / cs) * cs;
      len = cs * (1 + Math.floor(r() * 4));
    }
    len = Math.min(len, size - off);
    if (len <= 0) continue;
    if (x < 0.95) touch(off, len);
    if (x < 0.55) ops.push({ k: "write", off, len, seed: Math.floor(r() * 1e9) });
    else if (x < 0.75) ops.push({ k: "zero", off, len, unmap: r() < 0.5 });
    else if (x < 0.95) ops.push({ k: "discard", off, len });
    else ops.push({ k: "flush" });
  }
  return ops;
}

/** A short printable form of ops for failure messages. */
export function describeOps(ops: readonly Op[]): string {
  return ops
    .map((o) =>
      o.k === "flush"
        ? "flush"
        : `${o.k}${o.k === "zero" && o.unmap ? "(unmap)" : ""} ${o.off} ${o.len}`,
    )
    .join("; ");
}

/**
 * The guest bytes `ops` must leave on a disk of `size` bytes without a backing file (an
 * independent model: discards release whole clusters only, and those read as zeros).
 */
export function modelOf(size: number, cs: number, ops: readonly Op[]): Uint8Array {
  const m = new Uint8Array(size);
  for (const op of ops) {
    switch (op.k) {
      case "write":
        m.set(dataOf(op.seed, op.len), op.off);
        break;
      case "compressed":
        m.set(dataOf(op.seed, op.len, op.text === true), op.off);
        break;
      case "zero":
        m.fill(0, op.off, op.off + op.len);
        break;
      case "discard": {
        const end = op.off + op.len;
        const a = Math.ceil(op.off / cs) * cs;
        const b = end === size ? end : Math.floor(end / cs) * cs;
        if (a < b) m.fill(0, a, b);
        break;
      }
      case "flush":
        break;
    }
  }
  return m;
}
