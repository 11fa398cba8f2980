/**
 * Randomized snapshot sequences (src/snapshot.ts): snapshot / write / zero / discard / apply /
 * delete / resize / reopen through the driver, with `qemu-img snapshot -c/-a/-d` taking turns
 * on the same file, against an in-memory model of the active disk and of every snapshot; then
 * compared with qemu-img's view: `qemu-img convert -l` of each snapshot and of the active
 * image, the snapshot IDs and names, `qemu-img check` clean. Random cluster sizes, sizes not
 * multiples of the cluster, compat 1.1 and 0.10, extended L2, refcount widths, lazy refcounts.
 * A fixed slice by default; `QIMG_LONG=1` runs many more seeds (`QIMG_SEED` picks the first).
 * A failure names its seed and the operations.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import type { Qcow2Image } from "../src/index.js";
import { firstDiff, openRw, qemuCheck, qemuImg, qemuRaw, scratchDirs } from "./twins.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("snapshot-random.test: qemu-img not found, skipping");
const LONG = process.env.QIMG_LONG === "1";
const fresh = scratchDirs("qimg-snapshot-random-");

interface ModelSnapshot {
  id: string;
  name: string;
  bytes: Uint8Array;
}

function nextId(snaps: readonly ModelSnapshot[]): string {
  return String(Math.max(0, ...snaps.map((s) => Number(s.id))) + 1);
}

async function runCase(seed: number): Promise<void> {
  const r = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const v2 = r() < 0.3;
  const clusterBits = pick([9, 10, 12, 16]);
  const cs = 2 ** clusterBits;
  const extendedL2 = !v2 && clusterBits >= 14 && r() < 0.5;
  const refcountBits = v2 ? 16 : pick([2, 4, 16, 64]);
  const maxLive = refcountBits === 2 ? 1 : 4;
  let size = (1 + Math.floor(r() * 12)) * cs + Math.floor(r() * (cs / 512)) * 512 + 512;
  const dir = fresh();
  const file = path.join(dir, "r.qcow2");
  const opts = [
    `compat=${v2 ? "0.10" : "1.1"}`,
    `cluster_size=${cs}`,
    ...(v2 ? [] : [`refcount_bits=${refcountBits}`]),
    ...(extendedL2 ? ["extended_l2=on"] : []),
    ...(!v2 && r() < 0.3 ? ["lazy_refcounts=on"] : []),
  ].join(",");
  const log: string[] = [`create -o ${opts} ${size}`];
  const fail = (what: string): string =>
    `seed ${seed} (QIMG_SEED=${seed}): ${what}\n  ops: ${log.join("; ")}`;
  const c = qemuImg(["create", "-f", "qcow2", "-o", opts, file, String(size)]);
  expect(c.code, fail(c.stderr)).toBe(0);

  let active = new Uint8Array(size);
  const snaps: ModelSnapshot[] = [];
  let image: Qcow2Image = await openRw(file);
  let named = 0;
  const steps = 8 + Math.floor(r() * 12);
  try {
    for (let step = 0; step < steps; step++) {
      const x = r();
      if (x < 0.35) {
        const off = Math.floor(r() * size);
        const len = Math.min(size - off, 1 + Math.floor(r() * cs * 3));
        const data = new Uint8Array(len);
        for (let i = 0; i < len; i++) data[i] = Math.floor(r() * 256);
        log.push(`write ${off} ${len}`);
        await image.write(off, data);
        active.set(data, off);
      } else if (x < 0.42) {
        const off = Math.floor(r() * size);
        const len = Math.min(size - off, 1 + Math.floor(r() * cs * 2));
        log.push(`zero ${off} ${len}`);
        await image.writeZeroes(off, len);
        active.fill(0, off, off + len);
      } else if (x < 0.47 && !v2) {
        // Whole clusters only, as the driver (and QEMU) discard.
        const first = Math.floor(r() * Math.ceil(size / cs));
        const off = first * cs;
        const len = Math.min(size - off, cs * (1 + Math.floor(r() * 2)));
        log.push(`discard ${off} ${len}`);
        await image.discard(off, len);
        const end = off + len === size ? size : Math.floor((off + len) / cs) * cs;
        active.fill(0, off, end);
      } else if (x < 0.65) {
        if (snaps.length >= maxLive) continue;
        const name = r() < 0.2 && snaps.length > 0 ? pick(snaps).name : `s${named++}`;
        log.push(`snapshot -c ${name}`);
        const e = await image.createSnapshot(name);
        expect(e.id, fail("new snapshot id")).toBe(nextId(snaps));
        snaps.push({ id: e.id, name, bytes: active.slice() });
      } else if (x < 0.77) {
        if (snaps.length === 0) continue;
        const s = pick(snaps);
        log.push(`snapshot -a ${s.id}`);
        await image.applySnapshot(s.id);
        active = s.bytes.slice();
        size = active.length;
        expect(image.virtualSize, fail("size after apply")).toBe(size);
      } else if (x < 0.87) {
        if (snaps.length === 0) continue;
        const i = Math.floor(r() * snaps.length);
        const s = snaps[i]!;
        log.push(`snapshot -d id=${s.id}`);
        await image.deleteSnapshot({ id: s.id });
        snaps.splice(i, 1);
      } else if (x < 0.93 && !v2) {
        const grow = Math.floor((r() * cs * 3) / 512) * 512 + 512;
        log.push(`resize +${grow}`);
        await image.resize(size + grow);
        const bigger = new Uint8Array(size + grow);
        bigger.set(active);
        active = bigger;
        size += grow;
      } else if (r() < 0.5) {
        log.push("reopen");
        await image.close();
        image = await openRw(file);
      } else {
        // qemu-img takes a turn on the same file: create, apply (ID first) or delete (by name).
        await image.close();
        const y = r();
        let args: string[];
        if (y < 0.4 && snaps.length < maxLive) {
          const name = `q${named++}`;
          args = ["-c", name];
          snaps.push({ id: nextId(snaps), name, bytes: active.slice() });
        } else if (y < 0.7 && snaps.length > 0) {
          const s = pick(snaps);
          args = ["-a", s.id];
          active = s.bytes.slice();
          size = active.length;
        } else if (snaps.length > 0) {
          const name = pick(snaps).name;
          args = ["-d", name];
          snaps.splice(
            snaps.findIndex((s) => s.name === name),
            1,
          );
        } else {
          args = ["-l"];
        }
        log.push(`qemu-img snapshot ${args.join(" ")}`);
        const q = qemuImg(["snapshot", ...args, file]);
        expect(q.code, fail(q.stderr)).toBe(0);
        image = await openRw(file);
        expect(image.virtualSize, fail("size after qemu-img")).toBe(size);
      }
    }
  } catch (e) {
    await image.close().catch(() => undefined);
    throw new Error(fail(String(e)), { cause: e });
  }
  await image.close();

  // qemu-img's view.
  const v = qemuCheck(file);
  expect({ code: v.code, corruptions: v.corruptions, leaks: v.leaks }, fail(v.raw)).toEqual({
    code: 0,
    corruptions: 0,
    leaks: 0,
  });
  const got = qemuRaw(file);
  expect(got.length, fail("active size")).toBe(size);
  expect(firstDiff(got, active), fail("active image differs at byte")).toBe(-1);
  const info = JSON.parse(qemuImg(["info", "--output=json", file]).stdout) as {
    snapshots?: { id: string; name: string }[];
  };
  expect(
    (info.snapshots ?? []).map((s) => [s.id, s.name]),
    fail("snapshot table"),
  ).toEqual(snaps.map((s) => [s.id, s.name]));
  for (const s of snaps) {
    const out = path.join(dir, `snap-${s.id}.raw`);
    const cv = qemuImg(["convert", "-l", `snapshot.id=${s.id}`, "-O", "raw", file, out]);
    expect(cv.code, fail(cv.stderr)).toBe(0);
    // qemu-img reads a snapshot at the image's current size: zeros past the snapshot's end.
    const want = new Uint8Array(size);
    want.set(s.bytes.subarray(0, Math.min(size, s.bytes.length)));
    const snap = new Uint8Array(fs.readFileSync(out));
    expect(snap.length, fail(`snapshot ${s.id} size`)).toBe(size);
    expect(firstDiff(snap, want), fail(`snapshot ${s.id} differs at byte`)).toBe(-1);
    fs.rmSync(out);
  }
}

describe.skipIf(!haveQemu)("random snapshot sequences against a model and qemu-img", () => {
  const base = Number(process.env.QIMG_SEED ?? 1);
  const runs = LONG ? 300 : 20;
  it(`${runs} seeded sequences from seed ${base}`, async () => {
    for (let seed = base; seed < base + runs; seed++) await runCase(seed);
  }, 600_000);
});
