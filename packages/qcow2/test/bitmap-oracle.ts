/**
 * QEMU as the oracle for persistent dirty bitmaps: `qemu-img info` for the list and flags,
 * `qemu-img check` for the refcounts, and the dirty ranges exported by `qemu-nbd -B name`
 * read back with `qemu-img map` over the nbd driver's `x-dirty-bitmap` option (QEMU's own
 * iotests read bitmaps this way: a dirty range shows `"data": false`).
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { expect } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { openQcow2 } from "../src/index.js";
import type { Qcow2Image } from "../src/index.js";
import { readBitmapBits } from "../src/bitmap.js";

export interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export function run(tool: string, args: readonly string[]): Run {
  const r = spawnSync(tool, args, { encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export function must(tool: string, args: readonly string[]): string {
  const r = run(tool, args);
  if (r.code !== 0) throw new Error(`${tool} ${args.join(" ")}: exit ${r.code}: ${r.stderr}`);
  return r.stdout;
}

/** `qemu-img create -q -f qcow2 [-o options] file size`. */
export function createQcow2(file: string, size: number, options?: string): void {
  const o = options ? ["-o", options] : [];
  must("qemu-img", ["create", "-q", "-f", "qcow2", ...o, file, String(size)]);
}

export interface BitmapInfo {
  readonly name: string;
  readonly granularity: number;
  readonly flags: readonly string[];
}

/** The bitmap list of `qemu-img info --output=json` (empty when there is none). */
export function infoBitmaps(file: string): BitmapInfo[] {
  const info = JSON.parse(must("qemu-img", ["info", "-U", "--output=json", file])) as {
    "format-specific"?: { data?: { bitmaps?: BitmapInfo[] } };
  };
  return info["format-specific"]?.data?.bitmaps ?? [];
}

/** `qemu-img check --output=json`, with its exit code. */
export function check(file: string): { code: number; result: Record<string, unknown> } {
  const r = run("qemu-img", ["check", "-U", "--output=json", file]);
  let result: Record<string, unknown> = {};
  try {
    result = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    result = { unparsed: r.stdout + r.stderr };
  }
  return { code: r.code, result };
}

export type Ranges = [start: number, length: number][];

function merge(ranges: Ranges): Ranges {
  const out: Ranges = [];
  for (const [s, l] of ranges) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === s) last[1] += l;
    else out.push([s, l]);
  }
  return out;
}

/**
 * Dirty guest ranges of each named bitmap while `qemu-nbd -B NAME…` exports `file` read-only
 * on a fresh unix socket in `dir` (the bitmaps must be consistent, or qemu-nbd refuses them):
 * `read` gives one bitmap's dirty extents over the socket. Afterwards the server is stopped
 * and the socket and pid file removed.
 */
async function exportedDirtyRanges(
  file: string,
  names: readonly string[],
  dir: string,
  read: (sock: string, name: string) => Ranges,
): Promise<Map<string, Ranges>> {
  const out = new Map<string, Ranges>();
  if (names.length === 0) return out;
  const sock = path.join(dir, `nbd-${process.pid}-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  must("qemu-nbd", [
    "-t",
    "-r",
    "-f",
    "qcow2",
    "-k",
    sock,
    ...names.flatMap((n) => ["-B", n]),
    "--fork",
    `--pid-file=${pidFile}`,
    file,
  ]);
  try {
    for (const name of names) out.set(name, merge(read(sock, name)));
  } finally {
    for (let i = 0; i < 50 && !fs.existsSync(pidFile); i++)
      await new Promise((r) => setTimeout(r, 20));
    const pid = Number(fs.readFileSync(pidFile, "utf8").trim());
    if (pid > 0) process.kill(pid, "SIGTERM");
    fs.rmSync(sock, { force: true });
    fs.rmSync(pidFile, { force: true });
  }
  return out;
}

/**
 * Dirty guest ranges of each named bitmap as QEMU exports them (qemu-nbd -B, read back by
 * `qemu-img map` over the nbd driver's `x-dirty-bitmap` option; the bitmaps must be
 * consistent, or qemu-nbd refuses them).
 */
export function qemuDirtyRanges(
  file: string,
  names: readonly string[],
  dir: string,
): Promise<Map<string, Ranges>> {
  return exportedDirtyRanges(file, names, dir, (sock, name) => {
    const map = JSON.parse(
      must("qemu-img", [
        "map",
        "--output=json",
        "--image-opts",
        `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:${name}`,
      ]),
    ) as { start: number; length: number; data: boolean }[];
    return map.filter((e) => !e.data).map((e): [number, number] => [e.start, e.length]);
  });
}

/** Dirty guest ranges of each bitmap as our reader decodes them, clipped to the disk. */
export async function ourDirtyRanges(file: string): Promise<Map<string, Ranges>> {
  const backend = await FileBackend.open(file, { readOnly: true });
  const image = await openQcow2(backend, { noBacking: true });
  try {
    const out = new Map<string, Ranges>();
    for (const b of image.bitmaps) {
      const bits = await readBitmapBits(backend, b, image.clusterSize, image.virtualSize);
      const g = 2 ** b.granularityBits;
      const ranges: Ranges = [];
      for (let n = 0; n * g < image.virtualSize; n++) {
        if ((bits[n >> 3]! >> (n & 7)) & 1) {
          ranges.push([n * g, Math.min(g, image.virtualSize - n * g)]);
        }
      }
      out.set(b.name, merge(ranges));
    }
    return out;
  } finally {
    await image.close();
  }
}

/** True when nbdinfo (libnbd-bin) and qemu-nbd are installed. */
export function haveNbdinfo(): boolean {
  return run("nbdinfo", ["--version"]).code === 0 && run("qemu-nbd", ["--version"]).code === 0;
}

/**
 * Dirty guest ranges of each named bitmap as an NBD client sees them: `qemu-nbd -B NAME`
 * exports the bitmap as the `qemu:dirty-bitmap:NAME` metadata context and
 * `nbdinfo --map=qemu:dirty-bitmap:NAME` reads it (the bitmaps must be consistent).
 */
export function nbdinfoDirtyRanges(
  file: string,
  names: readonly string[],
  dir: string,
): Promise<Map<string, Ranges>> {
  return exportedDirtyRanges(file, names, dir, (sock, name) => {
    const map = JSON.parse(
      must("nbdinfo", ["--json", `--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///?socket=${sock}`]),
    ) as { offset: number; length: number; type: number }[];
    return map.filter((e) => (e.type & 1) !== 0).map((e): [number, number] => [e.offset, e.length]);
  });
}

/** Expected dirty ranges: each written range widened to the granularity, clipped to the disk. */
export function expectedRanges(
  writes: readonly [offset: number, length: number][],
  granularity: number,
  size: number,
): Ranges {
  const bits = new Set<number>();
  for (const [o, l] of writes) {
    if (l <= 0) continue;
    for (let n = Math.floor(o / granularity); n * granularity < Math.min(size, o + l); n++)
      bits.add(n);
  }
  const sorted = [...bits].sort((a, b) => a - b);
  return merge(
    sorted.map((n): [number, number] => [
      n * granularity,
      Math.min(granularity, size - n * granularity),
    ]),
  );
}

/**
 * Power loss at every write or flush of a close: for n = 0, 1, 2, … runs `session` on a fresh
 * in-memory copy of `bytes` and flushes, then closes with the (n+1)-th write or flush of the
 * close failing, loses power (the last write torn) and writes what survives to `out`. Each
 * survivor must show no corruption and no check error in `qemu-img check` and open read-write
 * in qemu-io; then `out` is written again (qemu-io's open may change it) and `judge` looks at
 * it. Stops after the first close that completes, and returns its n.
 */
export async function closeCrashes(
  bytes: Uint8Array,
  session: (image: Qcow2Image) => Promise<void>,
  out: string,
  judge: (where: string, completed: boolean) => Promise<void>,
): Promise<number> {
  for (let n = 0; ; n++) {
    const mem = new MemoryBackend();
    await mem.write(0, bytes);
    let counting = false;
    let ops = 0;
    const fault = await FaultBackend.wrap(mem, {
      failWhen: (op) => counting && (op === "write" || op === "flush") && ++ops > n,
    });
    const image = await openQcow2(fault, { readOnly: false });
    await session(image);
    await image.flush();
    counting = true;
    let completed = true;
    await image.close().catch(() => {
      completed = false;
    });
    const survivor = fault.powerLoss({ tearLastWrite: true, seed: n });
    fs.writeFileSync(out, survivor.snapshot());
    const where = `power loss after ${n} writes/flushes of the close`;
    const c = check(out);
    expect(c.result.corruptions ?? 0, where).toBe(0);
    expect(c.result["check-errors"] ?? 0, where).toBe(0);
    // QEMU opens it read-write (a torn directory would make it refuse the image).
    expect(run("qemu-io", ["-f", "qcow2", "-c", "read 0 512", out]).code, where).toBe(0);
    fs.writeFileSync(out, survivor.snapshot());
    await judge(where, completed);
    if (completed) return n;
  }
}
