/**
 * Crash safety of snapshot create, delete and apply (src/snapshot.ts): power is lost after every
 * write and flush of the operation in turn (the last write torn or not), through
 * `FaultBackend`. Each survivor must show the old or the new snapshot table, keep every
 * guest byte flushed before the crash (active image and every snapshot listed), and be made
 * clean by `qemu-img check -r all` (what it may find is leaks and stale COPIED flags only).
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { requireQemu } from "@qimg/fixtures";
import { openQcow2 } from "../src/index.js";
import type { Qcow2Image } from "../src/index.js";
import { dataOf, firstDiff, qemuCheck, qemuImg, scratchDirs } from "./twins.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("snapshot-crash.test: qemu-img not found, skipping");
const LONG = process.env.QIMG_LONG === "1";
const fresh = scratchDirs("qimg-snapshot-crash-");

type Op = (image: Qcow2Image) => Promise<unknown>;

/** qemu-img check lines of clusters with fewer references counted than they have (data at risk). */
function underCounted(checkOutput: string): string[] {
  const out: string[] = [];
  for (const m of checkOutput.matchAll(/ERROR cluster (\d+) refcount=(\d+) reference=(\d+)/g)) {
    if (Number(m[2]) < Number(m[3])) out.push(m[0]);
  }
  return out;
}

/** Guest bytes of the active image and of every snapshot, by snapshot name. */
async function contents(bytes: Uint8Array): Promise<Map<string, Uint8Array>> {
  const image = await openQcow2(MemoryBackend.from(bytes.slice()));
  const out = new Map<string, Uint8Array>();
  const active = new Uint8Array(image.virtualSize);
  await image.read(0, active);
  out.set("(active)", active);
  for (const s of image.snapshots) {
    const v = await image.openSnapshot({ id: s.id });
    const b = new Uint8Array(v.virtualSize);
    await v.read(0, b);
    out.set(`${s.id}:${s.name}`, b);
    await v.close();
  }
  await image.close();
  return out;
}

/** Run `op` on `before`, losing power after `ops` writes and flushes of it (-1: never). */
async function crashAt(
  before: Uint8Array,
  op: Op,
  ops: number,
  tear: boolean,
  seed: number,
): Promise<{ survivor: Uint8Array; used: number }> {
  let armed = false;
  let n = 0;
  const fault = await FaultBackend.wrap(MemoryBackend.from(before.slice()), {
    failWhen: (kind) => armed && (kind === "write" || kind === "flush") && ++n > ops && ops >= 0,
  });
  const image = await openQcow2(fault, { readOnly: false });
  armed = true;
  try {
    await op(image);
    await image.close();
  } catch (e) {
    if (!/injected/.test(String(e)) && !/injected/.test(String((e as Error).cause))) throw e;
    await image.close().catch(() => undefined);
  }
  return { survivor: fault.powerLoss({ tearLastWrite: tear, seed }).bytes(), used: n };
}

async function crashEveryWrite(
  name: string,
  before: Uint8Array,
  op: Op,
  after: Uint8Array,
  seed: number,
): Promise<void> {
  const dir = fresh();
  const old = await contents(before);
  const next = await contents(after);
  const { used } = await crashAt(before, op, -1, false, seed);
  expect(used, `${name}: the operation wrote something`).toBeGreaterThan(2);
  const r = prng(seed);
  for (let ops = 0; ops < used; ops++) {
    for (const tear of LONG ? [false, true] : [r() < 0.5]) {
      const label = `${name}: crash after ${ops} of ${used} writes/flushes (tear ${tear}, seed ${seed})`;
      const { survivor } = await crashAt(before, op, ops, tear, seed + ops);
      const got = await contents(survivor);
      const keys = [...got.keys()].join(",");
      const same = (want: Map<string, Uint8Array>): boolean =>
        keys === [...want.keys()].join(",") &&
        [...got].every(
          ([k, b]) => firstDiff(b, want.get(k)!) === -1 && b.length === want.get(k)!.length,
        );
      expect(
        same(old) || same(next),
        `${label}: neither the old nor the new state (snapshots ${keys})`,
      ).toBe(true);
      const file = path.join(dir, `crash-${ops}-${tear}.qcow2`);
      fs.writeFileSync(file, survivor);
      const pre = qemuCheck(file);
      // Leaks and stale COPIED flags (counted as corruptions by qemu-img) are all a crash
      // may leave; no check error, and the repair makes it clean.
      expect(pre.checkErrors, `${label}: ${pre.raw}`).toBe(0);
      expect(underCounted(pre.raw), `${label}: refcounts below references: ${pre.raw}`).toEqual([]);
      const fix = qemuImg(["check", "-r", "all", file]);
      expect([0, 2, 3], `${label}: ${fix.stdout}${fix.stderr}`).toContain(fix.code);
      const post = qemuCheck(file);
      expect(
        { code: post.code, corruptions: post.corruptions, leaks: post.leaks },
        `${label}: after -r all: ${post.raw}`,
      ).toEqual({
        code: 0,
        corruptions: 0,
        leaks: 0,
      });
      fs.rmSync(file);
    }
  }
}

/** A qcow2 image made by qemu-img, with data and (optionally) snapshots written by qimg. */
async function baseImage(
  options: string,
  size: number,
  snapshots: number,
  seed: number,
): Promise<Uint8Array> {
  const dir = fresh();
  const file = path.join(dir, "base.qcow2");
  const c = qemuImg(["create", "-f", "qcow2", "-o", options, file, String(size)]);
  expect(c.code, c.stderr).toBe(0);
  const mem = MemoryBackend.from(new Uint8Array(fs.readFileSync(file)));
  const image = await openQcow2(mem, { readOnly: false });
  const r = prng(seed);
  for (let k = 0; k <= snapshots; k++) {
    for (let w = 0; w < 4; w++) {
      const off = Math.floor(r() * size);
      const len = Math.min(size - off, 1 + Math.floor(r() * 40_000));
      await image.write(off, dataOf(seed * 100 + k * 10 + w, len));
    }
    if (k < snapshots) await image.createSnapshot(`base${k}`);
  }
  await image.close();
  return mem.bytes();
}

async function applied(before: Uint8Array, op: Op): Promise<Uint8Array> {
  const mem = MemoryBackend.from(before.slice());
  const image = await openQcow2(mem, { readOnly: false });
  await op(image);
  await image.close();
  return mem.bytes();
}

describe.skipIf(!haveQemu)("snapshot create and delete survive a crash at every write", () => {
  const cases = [
    { options: "cluster_size=4096", size: 300_000 + 1536, snapshots: 1 },
    { options: "compat=0.10,cluster_size=512", size: 40_000 + 512, snapshots: 2 },
    { options: "cluster_size=65536,refcount_bits=4", size: 3 * 65536 + 512, snapshots: 0 },
    {
      options: "cluster_size=65536,extended_l2=on,lazy_refcounts=on",
      size: 5 * 65536 + 1024,
      snapshots: 1,
    },
  ];
  for (const [i, c] of cases.entries()) {
    it(`create (${c.options}, ${c.snapshots} snapshots before)`, async () => {
      const before = await baseImage(c.options, c.size, c.snapshots, 10 + i);
      const op: Op = (image) => image.createSnapshot("new", { dateSec: 1, dateNsec: 0 });
      await crashEveryWrite(`create ${c.options}`, before, op, await applied(before, op), 10 + i);
    }, 120_000);
    if (c.snapshots > 0) {
      it(`apply (${c.options}, ${c.snapshots} snapshots)`, async () => {
        const before = await baseImage(c.options, c.size, c.snapshots, 30 + i);
        const op: Op = (image) => image.applySnapshot("base0");
        await crashEveryWrite(`apply ${c.options}`, before, op, await applied(before, op), 30 + i);
      }, 120_000);
      it(`delete (${c.options}, ${c.snapshots} snapshots)`, async () => {
        const before = await baseImage(c.options, c.size, c.snapshots, 20 + i);
        const op: Op = (image) => image.deleteSnapshot({ name: "base0" });
        await crashEveryWrite(`delete ${c.options}`, before, op, await applied(before, op), 20 + i);
      }, 120_000);
    }
  }
});
