/**
 * Persistent dirty bitmaps under qimg writes, with QEMU as the oracle: twin images get the
 * same operations through qemu-io and through the driver; afterwards both must show the same
 * bitmap list and flags (qemu-img info), the same dirty ranges (qemu-nbd -B + qemu-img map),
 * the same guest bytes (qemu-img compare), and ours must check clean (qemu-img check).
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { requireQemu } from "@qimg/fixtures";
import { AutoclearFeatures, openQcow2 } from "../src/index.js";
import { prng } from "./prng.js";
import {
  check,
  closeCrashes,
  createQcow2,
  infoBitmaps,
  must,
  ourDirtyRanges,
  qemuDirtyRanges,
  run,
} from "./bitmap-oracle.js";

const haveQemu = requireQemu();
const LONG = process.env.QIMG_LONG === "1";
if (!haveQemu) console.log("bitmaps.test: qemu-img not found, skipping the QEMU oracle tests");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-bitmaps-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

type Op =
  | { kind: "write"; off: number; len: number; pattern: number }
  | { kind: "zero"; off: number; len: number; unmap: boolean }
  | { kind: "discard"; off: number; len: number }
  | { kind: "compress"; off: number; len: number; pattern: number };

function qemuIoCommand(op: Op): string {
  switch (op.kind) {
    case "write":
      return `write -P ${op.pattern} ${op.off} ${op.len}`;
    case "zero":
      return `write -z${op.unmap ? " -u" : ""} ${op.off} ${op.len}`;
    case "discard":
      return `discard ${op.off} ${op.len}`;
    case "compress":
      return `write -c -P ${op.pattern} ${op.off} ${op.len}`;
  }
}

async function applyOurs(
  image: Awaited<ReturnType<typeof openQcow2>>,
  ops: readonly Op[],
): Promise<void> {
  for (const op of ops) {
    switch (op.kind) {
      case "write":
        await image.write(op.off, new Uint8Array(op.len).fill(op.pattern));
        break;
      case "zero":
        await image.writeZeroes(op.off, op.len, { mayUnmap: op.unmap });
        break;
      case "discard":
        await image.discard(op.off, op.len);
        break;
      case "compress":
        await image.writeCompressed(op.off, new Uint8Array(op.len).fill(op.pattern));
        break;
    }
  }
}

interface Twin {
  readonly seed: number;
  readonly ours: string;
  readonly theirs: string;
  readonly size: number;
  readonly clusterSize: number;
  readonly ops: Op[];
  /** The operations run in two sessions: [0, split) and [split, end). */
  readonly split: number;
  readonly describe: string;
}

/** Random image with 1..3 bitmaps (some disabled, some already dirty), copied into twins. */
function makeTwin(seed: number): Twin {
  const r = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const clusterSize = pick([512, 1024, 4096, 16384, 65536]);
  // Sizes from qemu-img create are whole sectors; keep them off the cluster and granularity.
  const size = 512 * (1 + Math.floor(r() * 12000)) + (r() < 0.7 ? 512 * 3 : 0);
  const opts = [`cluster_size=${clusterSize}`];
  if (r() < 0.25) opts.push("lazy_refcounts=on");
  if (clusterSize >= 16384 && r() < 0.3) opts.push("extended_l2=on");
  if (r() < 0.2) opts.push(`refcount_bits=${pick([1, 2, 8, 64])}`);
  // An external data file (bitmaps stay in the qcow2 file); each twin gets its own, named
  // with as many bytes so the header can be patched.
  const dataFile = r() < 0.15;
  const dir = path.join(tmp, `s${seed}`);
  if (dataFile) opts.push(`data_file=${path.join(dir, "dbase.raw")}`);
  fs.mkdirSync(dir, { recursive: true });
  const base = path.join(dir, "base.qcow2");
  must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", opts.join(","), base, String(size)]);
  const nb = 1 + Math.floor(r() * 3);
  const names: string[] = [];
  for (let i = 0; i < nb; i++) {
    const g = 2 ** (9 + Math.floor(r() * 12));
    const name = `b${i}-${g}`;
    names.push(name);
    must("qemu-img", [
      "bitmap",
      "--add",
      "-g",
      String(g),
      ...(r() < 0.3 ? ["--disable"] : []),
      base,
      name,
    ]);
  }
  // Some bitmaps already hold bits (and some clusters data) before the twins part.
  const touched = new Set<number>();
  const randRange = (maxLen: number): [number, number] => {
    const off = Math.floor(r() * size);
    const len = 1 + Math.floor(r() * Math.min(maxLen, size - off));
    return [off, len];
  };
  if (r() < 0.6) {
    const pre: string[] = [];
    for (let i = 0; i < 1 + Math.floor(r() * 3); i++) {
      const [off, len] = randRange(200_000);
      pre.push("-c", `write -P 7 ${off} ${len}`);
      for (
        let c = Math.floor(off / clusterSize);
        c <= Math.floor((off + len - 1) / clusterSize);
        c++
      )
        touched.add(c);
    }
    must("qemu-io", ["-f", "qcow2", ...pre, base]);
  }
  // Sometimes a crash already made the bitmaps inconsistent (IN_USE), and sometimes a
  // consistent one was added after it.
  let crashed = false;
  if (r() < 0.2) {
    const [off, len] = randRange(50_000);
    run("qemu-io", ["-f", "qcow2", "-c", `write -P 3 ${off} ${len}`, "-c", "abort", base]);
    for (let c = Math.floor(off / clusterSize); c <= Math.floor((off + len - 1) / clusterSize); c++)
      touched.add(c);
    crashed = true;
    if (r() < 0.5) {
      const g = 2 ** (9 + Math.floor(r() * 12));
      names.push(`late-${g}`);
      must("qemu-img", ["bitmap", "--add", "-g", String(g), base, `late-${g}`]);
    }
  }
  // Sometimes the header's size is not a multiple of 512 (QEMU uses the whole sectors).
  let odd = 0;
  const span = (clusterSize * clusterSize) / (opts.includes("extended_l2=on") ? 16 : 8);
  const oddTry = 1 + Math.floor(r() * 511);
  // (Only where the L1 table still covers the larger size, or QEMU refuses the image.)
  if (r() < 0.2 && Math.ceil((size + oddTry) / span) === Math.ceil(size / span)) {
    odd = oddTry;
    const fd = fs.openSync(base, "r+");
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(size + odd));
    fs.writeSync(fd, b, 0, 8, 24);
    fs.closeSync(fd);
  }
  const ours = path.join(dir, "ours.qcow2");
  const theirs = path.join(dir, "theirs.qcow2");
  fs.copyFileSync(base, ours);
  fs.copyFileSync(base, theirs);
  if (dataFile) {
    for (const [file, raw] of [
      [ours, "dours.raw"],
      [theirs, "dthem.raw"],
    ] as const) {
      const bytes = fs.readFileSync(file);
      const at = bytes.indexOf(path.join(dir, "dbase.raw"));
      bytes.write(path.join(dir, raw), at);
      fs.writeFileSync(file, bytes);
      fs.copyFileSync(path.join(dir, "dbase.raw"), path.join(dir, raw));
    }
  }
  const ops: Op[] = [];
  let freed = false;
  for (let i = 0, n = 1 + Math.floor(r() * 10); i < n; i++) {
    const x = r();
    const aligned = r() < 0.3;
    let [off, len] = randRange(r() < 0.2 ? size : 300_000);
    if (aligned) {
      off = Math.floor(off / clusterSize) * clusterSize;
      len = Math.max(clusterSize, Math.floor(len / clusterSize) * clusterSize);
      len = Math.min(len, size - off);
    }
    if (x < 0.45) ops.push({ kind: "write", off, len, pattern: 1 + Math.floor(r() * 250) });
    else if (x < 0.65) {
      ops.push({ kind: "zero", off, len, unmap: r() < 0.5 });
      freed = true;
    } else if (x < 0.85) {
      ops.push({ kind: "discard", off, len });
      freed = true;
    } else {
      // Compressed writes only into clusters nothing has written yet (QEMU refuses others),
      // and only before the first discard or zero write: qemu-io 7.2 keeps filling the host
      // cluster of its last compressed write after a discard freed it and a later write
      // reused it, so a compressed write then lands inside another guest cluster's data
      // (repro: cluster_size=16384, 1248256 bytes: write -c -P 108 606208 16384; write -z -u
      // 248740 602328; write -P 158 519294 68810; write -c -P 244 1097728 16384 -> guest
      // bytes 507937.. read compressed garbage). QEMU is the wrong twin there, not us.
      const c = Math.floor(off / clusterSize);
      const cOff = c * clusterSize;
      if (freed || dataFile || touched.has(c) || cOff >= size) continue;
      ops.push({
        kind: "compress",
        off: cOff,
        len: Math.min(clusterSize, size - cOff),
        pattern: 1 + Math.floor(r() * 250),
      });
      touched.add(c);
      continue;
    }
    const last = ops[ops.length - 1]!;
    for (
      let c = Math.floor(last.off / clusterSize);
      c <= Math.floor((last.off + last.len - 1) / clusterSize);
      c++
    )
      touched.add(c);
  }
  return {
    seed,
    ours,
    theirs,
    size,
    clusterSize,
    ops,
    split: Math.floor(r() * (ops.length + 1)),
    describe: `seed ${seed}: -o ${opts.join(",")} size ${size}${odd ? `+${odd}` : ""}${crashed ? " crashed" : ""} bitmaps ${names.join(",")}; ops ${ops.map(qemuIoCommand).join(" | ")}`,
  };
}

async function openRw(file: string) {
  const backend = await FileBackend.open(file, { readOnly: false });
  try {
    return await openQcow2(backend, {
      readOnly: false,
      openDataFile: (name, relativeTo) =>
        FileBackend.open(path.resolve(path.dirname(relativeTo), name), { readOnly: false }),
    });
  } catch (e) {
    await backend.close();
    throw e;
  }
}

/** Everything QEMU says about the bitmaps of `file`, for comparing twins. */
async function bitmapFacts(file: string) {
  const list = infoBitmaps(file);
  const consistent = list.filter((b) => !b.flags.includes("in-use")).map((b) => b.name);
  return { list, ranges: Object.fromEntries(await qemuDirtyRanges(file, consistent, tmp)) };
}

async function runTwin(seed: number): Promise<void> {
  const t = makeTwin(seed);
  try {
    for (const ops of [t.ops.slice(0, t.split), t.ops.slice(t.split)]) {
      if (ops.length === 0) continue;
      must("qemu-io", ["-f", "qcow2", ...ops.flatMap((o) => ["-c", qemuIoCommand(o)]), t.theirs]);
      const image = await openRw(t.ours);
      await applyOurs(image, ops);
      await image.close();
    }

    const c = check(t.ours);
    expect(c.result["check-errors"] ?? 0).toBe(0);
    expect(c.result.leaks ?? 0).toBe(0);
    expect(c.result.corruptions ?? 0).toBe(0);
    expect(c.code).toBe(0);
    expect(run("qemu-img", ["compare", "-q", t.theirs, t.ours]).code).toBe(0);
    const ours = await bitmapFacts(t.ours);
    const theirs = await bitmapFacts(t.theirs);
    expect(ours.list).toEqual(theirs.list);
    expect(ours.ranges).toEqual(theirs.ranges);
    // Our reader decodes QEMU's bitmaps exactly as QEMU exports them.
    const decoded = Object.fromEntries(await ourDirtyRanges(t.theirs));
    for (const [name, ranges] of Object.entries(theirs.ranges))
      expect(decoded[name]).toEqual(ranges);
  } catch (e) {
    console.error(`bitmaps differential failed: ${t.describe}`);
    throw e;
  }
}

describe.skipIf(!haveQemu)("persistent bitmaps against QEMU", () => {
  it("after a qimg write, qemu-img check is clean and qemu-img info still lists the bitmap without in-use", async () => {
    const file = path.join(tmp, "simple.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", file, "10485760"]);
    must("qemu-img", ["bitmap", "--add", file, "b0"]);
    must("qemu-img", ["bitmap", "--add", "-g", "131072", "--disable", file, "b1"]);
    const image = await openRw(file);
    await image.write(1_000_000, new Uint8Array(70_000).fill(9));
    await image.close();
    expect(infoBitmaps(file)).toEqual([
      { name: "b0", granularity: 65536, flags: ["auto"] },
      { name: "b1", granularity: 131072, flags: [] },
    ]);
    const c = check(file);
    expect(c.result.leaks ?? 0).toBe(0);
    expect(c.code).toBe(0);
    // The bits cover exactly the written range, at 64 KiB granularity; b1 stays clean.
    const ranges = await qemuDirtyRanges(file, ["b0", "b1"], tmp);
    expect(ranges.get("b0")).toEqual([[983040, 131072]]);
    expect(ranges.get("b1")).toEqual([]);
  });

  it("marks the bitmaps in use on disk from the read-write open until the clean close", async () => {
    const file = path.join(tmp, "inuse.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", file, "4194304"]);
    must("qemu-img", ["bitmap", "--add", file, "b0"]);
    must("qemu-img", ["bitmap", "--add", "--disable", file, "b1"]);
    const image = await openRw(file);
    // QEMU marks every bitmap it loads read-write in use (disabled ones too).
    expect(infoBitmaps(file).map((b) => b.flags)).toEqual([["in-use", "auto"], ["in-use"]]);
    expect(image.header.autoclearFeatures & AutoclearFeatures.maskOf("bitmaps")).not.toBe(0n);
    await image.write(0, new Uint8Array(512).fill(1));
    await image.close();
    expect(infoBitmaps(file).map((b) => b.flags)).toEqual([["auto"], []]);
  });

  it("a read-only open changes nothing", async () => {
    const file = path.join(tmp, "ro.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", file, "4194304"]);
    must("qemu-img", ["bitmap", "--add", file, "b0"]);
    const before = fs.readFileSync(file);
    const image = await openQcow2(await FileBackend.open(file, { readOnly: true }));
    await image.read(0, new Uint8Array(4096));
    await image.close();
    expect(fs.readFileSync(file).equals(before)).toBe(true);
  });

  it("a crash after writes leaves the bitmaps in use, as qemu-io's abort does", async () => {
    const base = path.join(tmp, "crash-base.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "3146240"]);
    must("qemu-img", ["bitmap", "--add", "-g", "4096", base, "b0"]);
    must("qemu-img", ["bitmap", "--add", "--disable", base, "b1"]);
    const theirs = path.join(tmp, "crash-theirs.qcow2");
    fs.copyFileSync(base, theirs);
    run("qemu-io", ["-f", "qcow2", "-c", "write -P 3 5000 70000", "-c", "abort", theirs]);
    // Ours: power is lost after the write reached the file (the close never happens).
    const mem = new MemoryBackend();
    await mem.write(0, fs.readFileSync(base));
    let dead = false;
    const fault = await FaultBackend.wrap(mem, { failWhen: () => dead });
    const image = await openQcow2(fault, { readOnly: false });
    await image.write(5000, new Uint8Array(70000).fill(3));
    await image.flush();
    dead = true;
    await image.close().catch(() => undefined);
    const ours = path.join(tmp, "crash-ours.qcow2");
    fs.writeFileSync(ours, mem.snapshot());
    expect(infoBitmaps(ours)).toEqual(infoBitmaps(theirs));
    expect(infoBitmaps(ours).map((b) => b.flags)).toEqual([["in-use", "auto"], ["in-use"]]);
    expect(check(ours).result.leaks ?? 0).toBe(0);
    expect(check(ours).code).toBe(check(theirs).code);
    // An image whose bitmaps are inconsistent stays so after our next clean session...
    const again = await openRw(ours);
    await again.write(0, new Uint8Array(4096).fill(1));
    await again.close();
    run("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 4096", theirs]);
    expect(infoBitmaps(ours)).toEqual(infoBitmaps(theirs));
    expect(infoBitmaps(ours).map((b) => b.flags)).toEqual([["in-use", "auto"], ["in-use"]]);
    expect(check(ours).code).toBe(0);
    // ...and cannot be resized, as QEMU refuses.
    const r = run("qemu-img", ["resize", theirs, "4194304"]);
    expect(r.code).toBe(1);
    const before = fs.readFileSync(ours);
    const img = await openRw(ours);
    await expect(img.resize(4194304)).rejects.toThrow(/Bitmap 'b0' is inconsistent/);
    await img.close();
    expect(infoBitmaps(ours)).toEqual(infoBitmaps(theirs));
    expect(JSON.parse(must("qemu-img", ["info", "--output=json", ours]))["virtual-size"]).toBe(
      before.length > 0 ? 3146240 : 0,
    );
  });

  it("resize grows the bitmaps as qemu-img resize does", async () => {
    for (const seed of [11, 12, 13]) {
      const r = prng(seed);
      const base = path.join(tmp, `resize-${seed}.qcow2`);
      const cs = [512, 4096, 65536][seed % 3]!;
      const size = 512 * (1 + Math.floor(r() * 5000));
      createQcow2(base, size, `cluster_size=${cs}`);
      must("qemu-img", ["bitmap", "--add", "-g", "512", base, "fine"]);
      must("qemu-img", ["bitmap", "--add", "-g", "65536", "--disable", base, "off"]);
      must("qemu-io", ["-f", "qcow2", "-c", `write -P 5 ${Math.floor(size / 3)} 3000`, base]);
      const ours = path.join(tmp, `resize-${seed}-ours.qcow2`);
      const theirs = path.join(tmp, `resize-${seed}-theirs.qcow2`);
      fs.copyFileSync(base, ours);
      fs.copyFileSync(base, theirs);
      const grown = size + 512 * (1 + Math.floor(r() * 40000));
      const tail = Math.max(0, grown - 7000);
      must("qemu-img", ["resize", "-q", theirs, String(grown)]);
      must("qemu-io", ["-f", "qcow2", "-c", `write -P 6 ${tail} 5000`, theirs]);
      const image = await openRw(ours);
      await image.resize(grown);
      await image.write(tail, new Uint8Array(5000).fill(6));
      await image.close();
      expect(check(ours).code).toBe(0);
      expect(check(ours).result.leaks ?? 0).toBe(0);
      expect(await bitmapFacts(ours)).toEqual(await bitmapFacts(theirs));
    }
  });

  it("power loss at any point of the close leaves bitmaps either in use or complete, never a broken image", async () => {
    const base = path.join(tmp, "close-crash-base.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=1024", base, "3000064"]);
    must("qemu-img", ["bitmap", "--add", "-g", "512", base, "fine"]);
    must("qemu-img", ["bitmap", "--add", "-g", "65536", base, "coarse"]);
    must("qemu-img", ["bitmap", "--add", "--disable", base, "off"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write -P 1 1000 5000", base]);
    const bytes = fs.readFileSync(base);
    const session = async (img: Awaited<ReturnType<typeof openQcow2>>): Promise<void> => {
      await img.write(700_001, new Uint8Array(300_000).fill(2));
      await img.writeZeroes(2_000_000, 10_000);
      await img.discard(0, 4096);
    };
    // The reference: the same session, closed cleanly.
    const ref = path.join(tmp, "close-crash-ref.qcow2");
    fs.writeFileSync(ref, bytes);
    const refImage = await openRw(ref);
    await session(refImage);
    await refImage.close();
    const expected = await bitmapFacts(ref);
    const out = path.join(tmp, "close-crash.qcow2");
    const last = await closeCrashes(bytes, session, out, async (where, completed) => {
      const list = infoBitmaps(out);
      // Either the autoclear bit is off (every bitmap dropped, as QEMU treats a directory
      // that was being rewritten) or each bitmap is in use or complete.
      if (list.length > 0) {
        expect(
          list.map((b) => b.name),
          where,
        ).toEqual(expected.list.map((b) => b.name));
        const facts = await bitmapFacts(out);
        for (const b of list) {
          if (b.flags.includes("in-use")) continue;
          expect(facts.ranges[b.name], `${where}: bitmap ${b.name}`).toEqual(
            expected.ranges[b.name],
          );
        }
      }
      if (completed) expect(list).toEqual(expected.list);
    });
    // Every write and flush of the close was a crash point.
    expect(last).toBeGreaterThan(8);
  });

  it("refuses a read-write open of bitmaps that break the spec, as QEMU does, changing nothing", async () => {
    const base = path.join(tmp, "bad-base.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "1048576"]);
    must("qemu-img", ["bitmap", "--add", "-g", "4096", base, "b0"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 0 8192", base]);
    const ro = await openQcow2(await FileBackend.open(base, { readOnly: true }));
    const dir = ro.bitmapDirectory!.offset;
    const table = ro.bitmaps[0]!.bitmapTableOffset;
    await ro.close();
    const poke = (file: string, at: number, bytes: number[]): void => {
      const fd = fs.openSync(file, "r+");
      fs.writeSync(fd, Buffer.from(bytes), 0, bytes.length, at);
      fs.closeSync(fd);
    };
    const damages: [string, number, number[]][] = [
      ["a reserved directory flag", dir + 15, [0x06]],
      ["a bitmap type other than 1", dir + 16, [2]],
      ["a granularity below 512", dir + 17, [8]],
      ["a table size that does not fit the disk", dir + 8, [0, 0, 0, 7]],
      ["reserved bits in a table entry", table + 7, [0x02]],
      ["a table entry with an offset and the all-ones bit", table, [0, 0, 0, 0, 0, 0, 0x10, 0x01]],
    ];
    for (const [what, at, bytes] of damages) {
      const file = path.join(tmp, "bad.qcow2");
      fs.copyFileSync(base, file);
      poke(file, at, bytes);
      expect(run("qemu-io", ["-f", "qcow2", "-c", "write 0 512", file]).code, what).not.toBe(0);
      const before = fs.readFileSync(file);
      await expect(openRw(file), what).rejects.toThrow(/bitmap 'b0'/);
      expect(fs.readFileSync(file).equals(before), what).toBe(true);
    }
    // Nothing else happens first either: not even the repair of a dirty lazy-refcounts image.
    const lazy = path.join(tmp, "bad-lazy.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", lazy, "1048576"]);
    must("qemu-img", ["bitmap", "--add", lazy, "b0"]);
    must("qemu-img", ["bitmap", "--add", lazy, "b1"]);
    run("qemu-io", ["-f", "qcow2", "-c", "write 0 8192", "-c", "abort", lazy]);
    const lro = await openQcow2(await FileBackend.open(lazy, { readOnly: true }));
    expect(lro.info().dirty).toBe(true);
    const at = lro.bitmapDirectory!.offset + lro.bitmapDirectory!.length - 32 + 15;
    await lro.close();
    poke(lazy, at, [0x06]);
    const before = fs.readFileSync(lazy);
    await expect(openRw(lazy)).rejects.toThrow(/bitmap 'b1'/);
    expect(fs.readFileSync(lazy).equals(before)).toBe(true);
  });

  it("a bitmap cluster aimed at guest data is never written over: the close ends no worse than qemu-io's", async () => {
    const base = path.join(tmp, "aimed.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "1048576"]);
    must("qemu-img", ["bitmap", "--add", "-g", "512", base, "b0"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write -P 9 0 8192", base]);
    const map = JSON.parse(must("qemu-img", ["map", "--output=json", base])) as {
      offset?: number;
    }[];
    const ro = await openQcow2(await FileBackend.open(base, { readOnly: true }));
    const table = ro.bitmaps[0]!.bitmapTableOffset;
    await ro.close();
    // Bitmap table entry 0 now points at guest cluster 0's data.
    const fd = fs.openSync(base, "r+");
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE(BigInt(map[0]!.offset!));
    fs.writeSync(fd, entry, 0, 8, table);
    fs.closeSync(fd);
    const ours = path.join(tmp, "aimed-ours.qcow2");
    const theirs = path.join(tmp, "aimed-theirs.qcow2");
    fs.copyFileSync(base, ours);
    fs.copyFileSync(base, theirs);
    must("qemu-io", ["-f", "qcow2", "-c", "write -P 4 9000 100", theirs]);
    const image = await openRw(ours);
    await image.write(9000, new Uint8Array(100).fill(4));
    await image.close();
    // Guest data intact (qemu-io's close discards the cluster it freed: zeros there).
    expect(run("qemu-io", ["-r", "-f", "qcow2", "-c", "read -P 9 0 8192", ours]).stdout).toMatch(
      /read 8192\/8192/,
    );
    const errors = (f: string): number =>
      ((check(f).result.corruptions as number | undefined) ?? 0) +
      ((check(f).result.leaks as number | undefined) ?? 0);
    expect(errors(ours)).toBeLessThanOrEqual(errors(theirs));
  });

  it("a compressed write QEMU refuses inside the request still dirties the range, as QEMU's", async () => {
    const base = path.join(tmp, "refused-c.qcow2");
    const dataFile = path.join(tmp, "refused-c.data");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "1048576"]);
    must("qemu-img", ["bitmap", "--add", "-g", "512", base, "b0"]);
    const withData = path.join(tmp, "refused-d.qcow2");
    must("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      `cluster_size=4096,data_file=${dataFile}`,
      withData,
      "1048576",
    ]);
    must("qemu-img", ["bitmap", "--add", "-g", "512", withData, "b0"]);
    for (const [file, off, len] of [
      [base, 1024, 4096], // not on a cluster boundary (on a sector one)
      [withData, 8192, 4096], // external data file
    ] as const) {
      const ours = `${file}.ours`;
      const theirs = `${file}.theirs`;
      fs.copyFileSync(file, ours);
      fs.copyFileSync(file, theirs);
      expect(
        run("qemu-io", ["-f", "qcow2", "-c", `write -c ${off} ${len}`, theirs]).stdout,
      ).toMatch(/write failed/);
      const image = await openRw(ours);
      await expect(image.writeCompressed(off, new Uint8Array(len))).rejects.toThrow();
      await image.close();
      expect(await bitmapFacts(ours)).toEqual(await bitmapFacts(theirs));
      expect((await bitmapFacts(ours)).ranges.b0).not.toEqual([]);
    }
  });

  it("keeps an all-ones table entry (which QEMU reads but never writes) as QEMU keeps its bits", async () => {
    const base = path.join(tmp, "ones.qcow2");
    // 512-byte clusters and granularity: one bitmap cluster covers 2 MiB of the 5 MiB disk.
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", base, "5242880"]);
    must("qemu-img", ["bitmap", "--add", "-g", "512", base, "b0"]);
    const ro = await openQcow2(await FileBackend.open(base, { readOnly: true }));
    const table = ro.bitmaps[0]!.bitmapTableOffset;
    await ro.close();
    const fd = fs.openSync(base, "r+");
    fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0, 1]), 0, 8, table + 8); // chunk 1: ones
    fs.closeSync(fd);
    const ours = path.join(tmp, "ones-ours.qcow2");
    const theirs = path.join(tmp, "ones-theirs.qcow2");
    fs.copyFileSync(base, ours);
    fs.copyFileSync(base, theirs);
    must("qemu-io", ["-f", "qcow2", "-c", "write 2100000 5000", "-c", "write 100 100", theirs]);
    const image = await openRw(ours);
    await image.write(2_100_000, new Uint8Array(5000));
    await image.write(100, new Uint8Array(100));
    await image.close();
    const facts = await bitmapFacts(ours);
    expect(facts).toEqual(await bitmapFacts(theirs));
    expect(facts.ranges.b0).toEqual([
      [0, 512],
      [2097152, 2097152],
    ]);
    expect(check(ours).code).toBe(0);
  });

  const cases = LONG ? 400 : 24;
  it(`random operations on twin images keep the same bitmaps as qemu-io (${cases} seeds)`, async () => {
    const first = Number(process.env.QIMG_SEED ?? 1);
    for (let s = first; s < first + cases; s++) await runTwin(s);
  }, 600_000);
});
