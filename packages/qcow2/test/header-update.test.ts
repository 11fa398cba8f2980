/**
 * Header updates (src/header-update.ts): a field that changes alone is one write of its bytes
 * (the dirty bit is 8 bytes at 72, as QEMU writes it), and a whole header area rewrite leaves
 * the old or the new area in effect whatever write a crash tears or loses. QEMU's qemu-img
 * info and check are the oracle for what the written images say.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import type { BackendKind, BlockBackend, ReadOptions } from "@qimg/io";
import { requireQemu } from "@qimg/fixtures";
import {
  ExtensionType,
  HEADER_FILLER_EXTENSION,
  decodeExtensions,
  decodeHeader,
  encodeHeaderArea,
  encodeStringExtension,
  openQcow2,
  planHeaderFieldWrite,
  rewriteHeaderArea,
  writeHeaderFields,
} from "../src/index.js";
import type { HeaderArea, Qcow2Header } from "../src/index.js";
import { openBacking } from "./open.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu)
  console.log("header-update.test: qemu-img not found, skipping the QEMU oracle tests");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-header-update-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

type Op = { op: "write"; offset: number; length: number } | { op: "flush" };

/** Passes everything through to `inner` and records writes and flushes. */
class Recorder implements BlockBackend {
  readonly ops: Op[] = [];
  constructor(readonly inner: BlockBackend) {}
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get kind(): BackendKind {
    return this.inner.kind;
  }
  get name(): string {
    return this.inner.name;
  }
  read(offset: number, buf: Uint8Array, options?: ReadOptions): Promise<void> {
    return this.inner.read(offset, buf, options);
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    this.ops.push({ op: "write", offset, length: data.byteLength });
    return this.inner.write(offset, data);
  }
  flush(): Promise<void> {
    this.ops.push({ op: "flush" });
    return this.inner.flush();
  }
  size(): Promise<number> {
    return this.inner.size();
  }
  truncate(size: number): Promise<void> {
    return this.inner.truncate(size);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

let files = 0;
function qemuImg(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync("qemu-img", args, { encoding: "utf8" });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** An image made by qemu-img create; returns its bytes (and keeps the file for backing names). */
function created(options: string, size: number, backing?: string): Uint8Array {
  const file = path.join(tmp, `img-${++files}.qcow2`);
  const args = ["create", "-q", "-f", "qcow2", "-o", options];
  if (backing !== undefined) args.push("-b", backing, "-F", "qcow2");
  args.push(file, String(size));
  const r = qemuImg(args);
  expect(r.status, r.stderr).toBe(0);
  return new Uint8Array(fs.readFileSync(file));
}

/** Write `bytes` to a file and return qemu-img's info (JSON) and check (exit code, output). */
function oracle(bytes: Uint8Array): {
  info: Record<string, unknown>;
  check: { status: number | null; out: string };
} {
  const file = path.join(tmp, `oracle-${++files}.qcow2`);
  fs.writeFileSync(file, bytes);
  const info = qemuImg(["info", "--output=json", file]);
  expect(info.status, `qemu-img info: ${info.stderr}`).toBe(0);
  const check = qemuImg(["check", file]);
  return {
    info: JSON.parse(info.stdout) as Record<string, unknown>,
    check: { status: check.status, out: check.stdout + check.stderr },
  };
}

function specific(info: Record<string, unknown>): Record<string, unknown> {
  return (info["format-specific"] as { data: Record<string, unknown> }).data;
}

async function fieldWrite(
  bytes: Uint8Array,
  change: (h: Qcow2Header) => Parameters<typeof writeHeaderFields>[2],
): Promise<{ ops: Op[]; bytes: Uint8Array; header: Qcow2Header }> {
  const mem = MemoryBackend.from(bytes.slice());
  const rec = new Recorder(mem);
  const header = await writeHeaderFields(rec, decodeHeader(bytes), change(decodeHeader(bytes)));
  return { ops: rec.ops, bytes: mem.bytes(), header };
}

/** Bytes that differ between a and b, as [first, last] (or undefined when equal). */
function diffRange(a: Uint8Array, b: Uint8Array): [number, number] | undefined {
  let first = -1;
  let last = -1;
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if ((a[i] ?? 0) !== (b[i] ?? 0)) {
      if (first < 0) first = i;
      last = i;
    }
  }
  return first < 0 ? undefined : [first, last];
}

describe("field-level header writes", () => {
  it("plans the exact byte runs QEMU writes", () => {
    const h = decodeHeader(created("lazy_refcounts=on", 5 << 20));
    const span = (c: Parameters<typeof planHeaderFieldWrite>[1]): [number, number] => {
      const p = planHeaderFieldWrite(h, c);
      return [p.offset, p.bytes.byteLength];
    };
    expect(span({ incompatibleFeatures: 1n })).toEqual([72, 8]);
    expect(span({ autoclearFeatures: 0n })).toEqual([88, 8]);
    expect(span({ compatibleFeatures: 0n })).toEqual([80, 8]);
    expect(span({ refcountTableOffset: 0x30000, refcountTableClusters: 2 })).toEqual([48, 12]);
    expect(span({ l1TableOffset: 0x50000, l1Size: 3 })).toEqual([36, 12]);
    expect(span({ size: 7 << 20 })).toEqual([24, 8]);
    expect(span({ size: 7 << 20, l1TableOffset: 0x50000, l1Size: 3 })).toEqual([24, 24]);
    expect(span({ nbSnapshots: 1, snapshotsOffset: 0x60000 })).toEqual([60, 12]);
    expect(span({})).toEqual([0, 0]);
  });

  it("refuses fields that are not written alone, out-of-range values and v3 fields on v2", () => {
    const v3 = decodeHeader(created("compat=1.1", 1 << 20));
    const v2 = decodeHeader(created("compat=0.10", 1 << 20));
    expect(() => planHeaderFieldWrite(v3, { backingFileOffset: 0 } as never)).toThrow(
      /not written alone/,
    );
    expect(() => planHeaderFieldWrite(v3, { l1Size: 2 ** 32 })).toThrow(/l1Size/);
    expect(() => planHeaderFieldWrite(v3, { size: -512 })).toThrow(/size/);
    expect(() => planHeaderFieldWrite(v3, { incompatibleFeatures: 1n << 64n })).toThrow(/u64/);
    expect(() => planHeaderFieldWrite(v2, { incompatibleFeatures: 1n })).toThrow(/version 2/);
    // A version 2 size change is fine: 8 bytes at 24.
    expect(planHeaderFieldWrite(v2, { size: 3 << 20 }).offset).toBe(24);
  });

  it.skipIf(!haveQemu)(
    "dirty bit: one 8-byte write at 72 and a sync; qemu-img sees it",
    async () => {
      const img = created("lazy_refcounts=on", 5 << 20);
      const set = await fieldWrite(img, (h) => ({
        incompatibleFeatures: h.incompatibleFeatures | 1n,
      }));
      expect(set.ops).toEqual([{ op: "write", offset: 72, length: 8 }, { op: "flush" }]);
      expect(diffRange(img, set.bytes)).toEqual([79, 79]);
      const dirty = oracle(set.bytes);
      expect(dirty.info["dirty-flag"]).toBe(true);
      const clear = await fieldWrite(set.bytes, (h) => ({
        incompatibleFeatures: h.incompatibleFeatures & ~1n,
      }));
      expect(clear.ops).toEqual([{ op: "write", offset: 72, length: 8 }, { op: "flush" }]);
      expect(diffRange(img, clear.bytes)).toBeUndefined();
      expect(oracle(clear.bytes).info["dirty-flag"]).toBe(false);
    },
  );

  it.skipIf(!haveQemu)("corrupt bit and autoclear bits: 8 bytes each", async () => {
    const img = created("compat=1.1", 3 << 20);
    const corrupt = await fieldWrite(img, (h) => ({
      incompatibleFeatures: h.incompatibleFeatures | 2n,
    }));
    expect(corrupt.ops).toEqual([{ op: "write", offset: 72, length: 8 }, { op: "flush" }]);
    expect(specific(oracle(corrupt.bytes).info)["corrupt"]).toBe(true);
    const auto = await fieldWrite(img, () => ({ autoclearFeatures: 1n << 40n }));
    expect(auto.ops).toEqual([{ op: "write", offset: 88, length: 8 }, { op: "flush" }]);
    expect(diffRange(img, auto.bytes)).toEqual([90, 90]);
    expect(oracle(auto.bytes).check.status).toBe(0);
  });

  it.skipIf(!haveQemu)(
    "size: 8 bytes at 24; L1 switch: 12 bytes at 36; no flush when told",
    async () => {
      const img = created("cluster_size=4096", 3 << 20);
      const grown = (3 << 20) + 7 * 512;
      const size = await fieldWrite(img, () => ({ size: grown }));
      expect(size.ops).toEqual([{ op: "write", offset: 24, length: 8 }, { op: "flush" }]);
      expect(oracle(size.bytes).info["virtual-size"]).toBe(grown);
      // Move the L1 table: copy it to a new cluster at the end, then switch offset and size.
      const h = decodeHeader(img);
      const cs = 4096;
      const mem = MemoryBackend.from(img.slice());
      const end = Math.ceil((await mem.size()) / cs) * cs;
      const l1 = new Uint8Array(cs);
      await mem.read(h.l1TableOffset, l1.subarray(0, h.l1Size * 8));
      await mem.write(end, l1);
      const rec = new Recorder(mem);
      const next = await writeHeaderFields(
        rec,
        h,
        { l1TableOffset: end, l1Size: h.l1Size },
        { flush: false },
      );
      expect(rec.ops).toEqual([{ op: "write", offset: 36, length: 12 }]);
      expect(next.l1TableOffset).toBe(end);
      const q = oracle(mem.bytes());
      // The old L1 cluster leaks, the new one is unreferenced in the refcounts: qemu-img check
      // sees the image through the new L1 (it complains about refcounts, not the header).
      expect(q.check.out).toMatch(/refcount|leak/i);
      expect(q.info["virtual-size"]).toBe(3 << 20);
    },
  );

  it.skipIf(!haveQemu)("refcount table switch: 12 bytes at 48", async () => {
    const img = created("cluster_size=4096", 3 << 20);
    const h = decodeHeader(img);
    const mem = MemoryBackend.from(img.slice());
    const end = Math.ceil((await mem.size()) / 4096) * 4096;
    const table = new Uint8Array(h.refcountTableClusters * 4096);
    await mem.read(h.refcountTableOffset, table);
    await mem.write(end, table);
    const rec = new Recorder(mem);
    await writeHeaderFields(rec, h, {
      refcountTableOffset: end,
      refcountTableClusters: h.refcountTableClusters,
    });
    expect(rec.ops).toEqual([{ op: "write", offset: 48, length: 12 }, { op: "flush" }]);
    const changed = diffRange(img.subarray(0, 4096), mem.bytes().subarray(0, 4096))!;
    expect(changed[0]).toBeGreaterThanOrEqual(48);
    expect(changed[1]).toBeLessThan(60);
    // The new table is live; the copy is not counted and the old one leaks: -r all repairs it.
    const file = path.join(tmp, `reftable-${++files}.qcow2`);
    fs.writeFileSync(file, mem.bytes());
    expect(qemuImg(["check", "-r", "all", file]).status).toBe(0);
    expect(qemuImg(["check", file]).status).toBe(0);
  });
});

/** The header area of `bytes` as the driver keeps it. */
function areaOf(bytes: Uint8Array): HeaderArea {
  const h = decodeHeader(bytes);
  const cs = 2 ** h.clusterBits;
  const start = h.version === 2 ? 72 : h.headerLength;
  const end = h.backingFileOffset > start ? h.backingFileOffset : cs;
  const extensions = decodeExtensions(bytes.subarray(0, cs), start, end);
  const backingFile =
    h.backingFileOffset !== 0
      ? new TextDecoder().decode(
          bytes.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize),
        )
      : undefined;
  return { header: h, extensions, backingFile };
}

/** What a header area means (what "in effect" compares): header, extensions, name. */
function meaning(bytes: Uint8Array): string {
  const a = areaOf(bytes);
  const { backingFileOffset: _o, backingFileSize: _s, ...fields } = a.header;
  return JSON.stringify(
    {
      fields,
      extensions: a.extensions
        .filter((e) => e.type !== HEADER_FILLER_EXTENSION)
        .map((e) => [e.type, Array.from(e.data)]),
      backingFile: a.backingFile,
    },
    (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v),
  );
}

interface AreaCase {
  name: string;
  /** The image before, and the new area. */
  make(): { bytes: Uint8Array; next: HeaderArea };
  /** Which of rewriteHeaderArea's three orders applies. */
  shape: "one write" | "tail first" | "staged";
}

const ext = (type: number, data: Uint8Array): { type: number; data: Uint8Array } => ({
  type,
  data,
});

/** A 1 MiB qcow2 base image at `name` under the temporary directory (made once); its path. */
function baseImage(name: string): string {
  const base = path.join(tmp, name);
  if (!fs.existsSync(base)) {
    fs.mkdirSync(path.dirname(base), { recursive: true });
    expect(qemuImg(["create", "-q", "-f", "qcow2", base, "1M"]).status).toBe(0);
  }
  return base;
}

function backed(name: string, options = "cluster_size=65536"): Uint8Array {
  return created(options, (2 << 20) + 3 * 512, baseImage(name));
}

const AREA_CASES: AreaCase[] = [
  {
    name: "backing name of the same length, inside one sector: one write",
    shape: "one write",
    make: () => {
      const bytes = backed("base-a.qcow2");
      const a = areaOf(bytes);
      return { bytes, next: { ...a, backingFile: baseImage("base-b.qcow2") } };
    },
  },
  {
    name: "a long backing name and a new extension on a small area (grows past sector 0)",
    shape: "tail first",
    make: () => {
      const bytes = created("cluster_size=4096", 3 << 20);
      const a = areaOf(bytes);
      const base = baseImage(`${"d".repeat(150)}/${"e".repeat(150)}/${"h".repeat(150)}/b.qcow2`);
      return {
        bytes,
        next: {
          ...a,
          extensions: [
            ext(ExtensionType.backingFormat, encodeStringExtension("qcow2")),
            ...a.extensions,
          ],
          backingFile: base,
        },
      };
    },
  },
  {
    name: "a new extension at the front of an area that spans two sectors (staged)",
    shape: "staged",
    make: () => {
      const bytes = backed("base-c.qcow2");
      const a = areaOf(bytes);
      return {
        bytes,
        next: {
          ...a,
          extensions: [ext(0x12345678, new Uint8Array(37).fill(0x5a)), ...a.extensions],
        },
      };
    },
  },
  {
    name: "dropping the backing file and the feature table (shrinks)",
    shape: "one write",
    make: () => {
      const bytes = backed("base-d.qcow2");
      const a = areaOf(bytes);
      return {
        bytes,
        next: {
          header: a.header,
          extensions: a.extensions.filter(
            (e) =>
              e.type !== ExtensionType.featureNameTable && e.type !== ExtensionType.backingFormat,
          ),
          backingFile: undefined,
        },
      };
    },
  },
  {
    name: "version 2 image: a backing name and format added",
    shape: "one write",
    make: () => {
      const bytes = created("compat=0.10,cluster_size=4096", 3 << 20);
      const a = areaOf(bytes);
      const base = baseImage("base-v2.qcow2");
      return {
        bytes,
        next: {
          ...a,
          extensions: [ext(ExtensionType.backingFormat, encodeStringExtension("qcow2"))],
          backingFile: base,
        },
      };
    },
  },
];

/** Run the rewrite through a FaultBackend that loses power after `ops` writes and flushes. */
async function crashAt(
  bytes: Uint8Array,
  next: HeaderArea,
  ops: number,
  tear: boolean,
  seed: number,
): Promise<{ survivor: Uint8Array; finished: boolean }> {
  let n = 0;
  const fault = await FaultBackend.wrap(MemoryBackend.from(bytes.slice()), {
    failWhen: (op) => (op === "write" || op === "flush") && ++n > ops,
  });
  let finished = true;
  try {
    await rewriteHeaderArea(fault, next);
  } catch (e) {
    expect(String(e)).toMatch(/injected/);
    finished = false;
  }
  return { survivor: fault.powerLoss({ tearLastWrite: tear, seed }).bytes(), finished };
}

describe("whole header area rewrite", () => {
  for (const c of AREA_CASES) {
    it.skipIf(!haveQemu)(`${c.name}: ends as encodeHeaderArea lays it out`, async () => {
      const { bytes, next } = c.make();
      const mem = MemoryBackend.from(bytes.slice());
      const rec = new Recorder(mem);
      const written = await rewriteHeaderArea(rec, next);
      const expected = encodeHeaderArea(next.header, next.extensions, next.backingFile);
      expect(written).toEqual(expected.header);
      const after = mem.bytes();
      const cs = 2 ** next.header.clusterBits;
      const want = new Uint8Array(cs);
      want.set(expected.bytes);
      expect(diffRange(after.subarray(0, cs), want), "cluster 0").toBeUndefined();
      // Nothing past cluster 0 changed.
      expect(diffRange(after.subarray(cs), bytes.subarray(cs))).toBeUndefined();
      // Every write either fits one sector or lands where nothing live is (checked by the
      // crash runs below); the last operation is a sync.
      expect(rec.ops[rec.ops.length - 1]).toEqual({ op: "flush" });
      const writes = rec.ops.flatMap((o) => (o.op === "write" ? [[o.offset, o.length]] : []));
      // Each write is followed by a sync (the order is the crash safety).
      expect(rec.ops.length).toBe(writes.length * 2);
      // A last write may zero what is left of the old area past the new one.
      if (writes[writes.length - 1]![0] === expected.bytes.byteLength) writes.pop();
      const inSector = ([o, l]: number[]): boolean =>
        Math.floor(o! / 512) === Math.floor((o! + l! - 1) / 512);
      if (c.shape === "one write") {
        expect(writes.length).toBe(1);
        expect(inSector(writes[0]!)).toBe(true);
      } else if (c.shape === "tail first") {
        expect(writes.length).toBe(2);
        expect(writes[0]![0]).toBeGreaterThanOrEqual(512);
        expect(writes[1]![0]! + writes[1]![1]!).toBeLessThanOrEqual(512);
      } else {
        // Staged: copy past both areas, switch, in place, switch back.
        expect(writes.length).toBe(4);
        expect(writes[0]![0]).toBeGreaterThanOrEqual(expected.bytes.byteLength);
        expect(writes[1]![0]).toBe(0);
        expect(writes[1]![1]).toBeLessThanOrEqual(512);
        expect(writes[3]).toEqual([0, 512]);
      }
      const q = oracle(after);
      expect(q.check.status, q.check.out).toBe(0);
      expect(q.info["backing-filename"]).toBe(next.backingFile);
      const reopened = await openQcow2(MemoryBackend.from(after), { openBacking });
      expect(reopened.virtualSize).toBe(next.header.size);
      await reopened.close();
    });

    it.skipIf(!haveQemu)(
      `${c.name}: a crash at any write leaves the old or the new area`,
      async () => {
        const { bytes, next } = c.make();
        const oldMeaning = meaning(bytes);
        const newMeaning = meaning(
          (() => {
            const e = encodeHeaderArea(next.header, next.extensions, next.backingFile);
            const b = bytes.slice();
            b.set(e.bytes);
            return b;
          })(),
        );
        expect(newMeaning).not.toBe(oldMeaning);
        // How many writes and flushes a complete rewrite makes.
        const rec = new Recorder(MemoryBackend.from(bytes.slice()));
        await rewriteHeaderArea(rec, next);
        const total = rec.ops.length;
        const seed0 = Number(process.env.QIMG_SEED ?? 12);
        const r = prng(seed0);
        let sawOld = false;
        let sawNew = false;
        for (let ops = 0; ops <= total; ops++) {
          for (const tear of [false, true, true]) {
            const seed = (r() * 2 ** 32) >>> 0;
            const { survivor, finished } = await crashAt(bytes, next, ops, tear, seed);
            expect(finished).toBe(ops === total);
            const m = meaning(survivor);
            const label = `${c.name}: crash after ${ops} of ${total} ops (tear ${tear}, seed ${seed}, QIMG_SEED ${seed0})`;
            expect([oldMeaning, newMeaning], label).toContain(m);
            if (m === oldMeaning) sawOld = true;
            else sawNew = true;
            if (finished) expect(m, label).toBe(newMeaning);
            // QEMU opens it and finds nothing wrong, and so do we.
            const q = oracle(survivor);
            expect(q.check.status, `${label}: ${q.check.out}`).toBe(0);
            const image = await openQcow2(MemoryBackend.from(survivor), { openBacking });
            await image.close();
          }
        }
        expect(sawOld && sawNew).toBe(true);
      },
    );
  }

  it("refuses (writing nothing) when cluster 0 has no room for a crash-safe staging copy", async () => {
    if (!haveQemu) return;
    // An old area that spans two sectors (a long backing name), and a new extension at the
    // front that leaves no room to stage the new area past the old one in a 1 KiB cluster.
    const bytes = created(
      "cluster_size=1024",
      3 << 20,
      baseImage(`${"f".repeat(200)}/${"g".repeat(200)}/base.qcow2`),
    );
    const a = areaOf(bytes);
    const next = { ...a, extensions: [ext(0x12345678, new Uint8Array(200)), ...a.extensions] };
    const mem = MemoryBackend.from(bytes.slice());
    const rec = new Recorder(mem);
    await expect(rewriteHeaderArea(rec, next)).rejects.toThrow(/crash-safely/);
    expect(rec.ops.filter((o) => o.op === "write")).toEqual([]);
  });
});

describe("the driver's header writes go through header-update", () => {
  /** Writes the driver makes into cluster 0 (the header area), as [offset, length]. */
  function headerWrites(rec: Recorder, cs: number): [number, number][] {
    return rec.ops.flatMap((o) =>
      o.op === "write" && o.offset < cs ? [[o.offset, o.length]] : [],
    );
  }

  it.skipIf(!haveQemu)(
    "lazy refcounts: the dirty bit is set and cleared with 8-byte writes at 72, nothing else",
    async () => {
      const img = created("lazy_refcounts=on,cluster_size=4096", (5 << 20) + 3 * 512);
      const mem = MemoryBackend.from(img.slice());
      const rec = new Recorder(mem);
      const image = await openQcow2(rec, { readOnly: false });
      const r = prng(Number(process.env.QIMG_SEED ?? 7));
      await image.write(12_345, fill(r, 70_001));
      await image.flush();
      expect(headerWrites(rec, 4096)).toEqual([[72, 8]]);
      const mid = oracle(mem.bytes());
      expect(mid.info["dirty-flag"]).toBe(true);
      await image.close();
      expect(headerWrites(rec, 4096)).toEqual([
        [72, 8],
        [72, 8],
      ]);
      const q = oracle(mem.bytes());
      expect(q.info["dirty-flag"]).toBe(false);
      expect(q.check.status, q.check.out).toBe(0);
      // Only the dirty bit's byte differs from QEMU's header area.
      expect(diffRange(img.subarray(0, 4096), mem.bytes().subarray(0, 4096))).toBeUndefined();
    },
  );

  it.skipIf(!haveQemu)(
    "an unknown autoclear bit is cleared with 8 bytes at 88; a resize writes 8 bytes at 24",
    async () => {
      const img = created("cluster_size=4096", 3 << 20);
      img[95] = 0x80; // autoclear bit 7, unknown
      const mem = MemoryBackend.from(img.slice());
      const rec = new Recorder(mem);
      const image = await openQcow2(rec, { readOnly: false });
      expect(headerWrites(rec, 4096)).toEqual([[88, 8]]);
      const grown = (3 << 20) + 5 * 512;
      await image.resize(grown);
      expect(headerWrites(rec, 4096)).toEqual([
        [88, 8],
        [24, 8],
      ]);
      await image.close();
      const q = oracle(mem.bytes());
      expect(q.info["virtual-size"]).toBe(grown);
      expect(q.check.status, q.check.out).toBe(0);
    },
  );
});

function fill(r: () => number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (r() * 256) | 0;
  return b;
}

describe("whole header area rewrite, randomized", () => {
  const KNOWN: ReadonlySet<number> = new Set([
    0,
    ExtensionType.backingFormat,
    ExtensionType.featureNameTable,
    ExtensionType.bitmaps,
    ExtensionType.fullDiskEncryption,
    ExtensionType.externalDataFile,
    HEADER_FILLER_EXTENSION,
  ]);

  /** A random area for `header`: unknown extensions of random sizes, maybe a backing name. */
  function randomArea(r: () => number, header: Qcow2Header, names: string[]): HeaderArea {
    const extensions: { type: number; data: Uint8Array }[] = [];
    const n = Math.floor(r() * 4);
    for (let i = 0; i < n; i++) {
      let type = 0;
      while (KNOWN.has(type)) type = (r() * 2 ** 32) >>> 0;
      extensions.push({ type, data: fill(r, Math.floor(r() * 500)) });
    }
    const backingFile = r() < 0.7 ? names[Math.floor(r() * names.length)] : undefined;
    if (backingFile !== undefined && r() < 0.6) {
      extensions.splice(Math.floor(r() * (extensions.length + 1)), 0, {
        type: ExtensionType.backingFormat,
        data: encodeStringExtension("qcow2"),
      });
    }
    return { header, extensions, backingFile };
  }

  it.skipIf(!haveQemu)(
    "any old area to any new one: a crash at any write leaves one of them, which QEMU opens",
    async () => {
      const seed0 = Number(process.env.QIMG_SEED ?? 1);
      const rounds = process.env.QIMG_LONG === "1" ? 300 : 24;
      // Backing files whose names have many lengths (QEMU opens the backing file for info).
      const names = [0, 1, 2, 4, 7].map((k, i) =>
        baseImage(`rnd${i}/${Array.from({ length: k }, () => "n".repeat(99)).join("/")}/b.qcow2`),
      );
      let staged = 0;
      for (let round = 0; round < rounds; round++) {
        const seed = seed0 + round;
        const r = prng(seed);
        const cs = [4096, 65536, 2048][round % 3]!;
        const start = created(`cluster_size=${cs}`, (3 << 20) + 512 * Math.floor(r() * 64));
        const header = decodeHeader(start);
        // The old area: written by rewriteHeaderArea itself (checked by the cases above).
        let oldArea = randomArea(r, header, names);
        const mem = MemoryBackend.from(start.slice());
        try {
          await rewriteHeaderArea(mem, oldArea);
        } catch (e) {
          if (!/crash-safely|more than the/.test(String(e))) throw e;
          oldArea = { header, extensions: [], backingFile: undefined };
          await rewriteHeaderArea(mem, oldArea);
        }
        const before = mem.bytes();
        const next = randomArea(r, decodeHeader(before), names);
        const label = `seed ${seed} (QIMG_SEED=${seed}), cluster ${cs}`;
        const rec = new Recorder(MemoryBackend.from(before.slice()));
        try {
          await rewriteHeaderArea(rec, next);
        } catch (e) {
          // Refused: nothing was written.
          expect(String(e), label).toMatch(/crash-safely|more than the/);
          expect(rec.ops, label).toEqual([]);
          continue;
        }
        if (rec.ops.filter((o) => o.op === "write").length >= 4) staged++;
        const oldMeaning = meaning(before);
        const want = before.slice();
        want.set(encodeHeaderArea(next.header, next.extensions, next.backingFile).bytes);
        const newMeaning = meaning(want);
        for (let ops = 0; ops <= rec.ops.length; ops++) {
          const tear = r() < 0.5;
          const crashSeed = (r() * 2 ** 32) >>> 0;
          const { survivor, finished } = await crashAt(before, next, ops, tear, crashSeed);
          const at = `${label}: crash after ${ops} of ${rec.ops.length} ops (tear ${tear}, seed ${crashSeed})`;
          const m = meaning(survivor);
          expect([oldMeaning, newMeaning], at).toContain(m);
          if (finished) expect(m, at).toBe(newMeaning);
          const image = await openQcow2(MemoryBackend.from(survivor), { noBacking: true });
          await image.close();
          if (ops === rec.ops.length || round % 4 === 0) {
            const q = oracle(survivor);
            expect(q.check.status, `${at}: ${q.check.out}`).toBe(0);
          }
        }
      }
      // The staged order (an area that moves past the first sector) was exercised.
      expect(staged).toBeGreaterThan(0);
    },
    300_000,
  );
});
