/**
 * Interop with QEMU: read the refcounts of images qemu-img/qemu-io made, and have
 * `qemu-img check` judge structures this package grew. Skips (with a printed reason) when
 * qemu-img is not on PATH; fails instead when QIMG_REQUIRE_QEMU=1.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ClusterCache } from "@qimg/cluster-cache";
import { FileBackend } from "@qimg/io/node";
import type { BlockBackend } from "@qimg/io";
import { Refcounts } from "../src/index.js";
import { walk } from "../src/image.testkit.js";

function haveQemu(): boolean {
  const r = spawnSync("qemu-img", ["--version"], { encoding: "utf8" });
  const q = spawnSync("qemu-io", ["--version"], { encoding: "utf8" });
  return r.status === 0 && q.status === 0;
}

const available = haveQemu();
if (!available) {
  if (process.env.QIMG_REQUIRE_QEMU === "1")
    throw new Error("QIMG_REQUIRE_QEMU=1 but qemu-img/qemu-io are not on PATH");
  console.log("skipping refcount interop tests: qemu-img or qemu-io not found on PATH");
}

interface Header {
  clusterBits: number;
  l1Size: number;
  l1Offset: number;
  tableOffset: number;
  tableClusters: number;
  refcountOrder: number;
}

async function readHeader(b: BlockBackend): Promise<Header> {
  const h = new Uint8Array(104);
  await b.read(0, h);
  const v = new DataView(h.buffer);
  const u64 = (o: number): number =>
    v.getUint32(o, false) * 0x1_0000_0000 + v.getUint32(o + 4, false);
  return {
    clusterBits: v.getUint32(20, false),
    l1Size: v.getUint32(36, false),
    l1Offset: u64(40),
    tableOffset: u64(48),
    tableClusters: v.getUint32(56, false),
    refcountOrder: v.getUint32(4, false) >= 3 ? v.getUint32(96, false) : 4,
  };
}

/** Every cluster the image references: header, L1, L2 tables and data (uncompressed images only). */
async function referenced(b: BlockBackend, h: Header): Promise<Set<number>> {
  const cs = 2 ** h.clusterBits;
  const out = new Set<number>([0]);
  const l1 = new Uint8Array(h.l1Size * 8);
  await b.read(h.l1Offset, l1);
  for (let c = 0; c < Math.ceil(l1.length / cs); c++) out.add(h.l1Offset / cs + c);
  const OFF_HI = 0x00ff_ffff;
  const l1v = new DataView(l1.buffer);
  const l2 = new Uint8Array(cs);
  const l2v = new DataView(l2.buffer);
  for (let i = 0; i < h.l1Size; i++) {
    const l2Off =
      (l1v.getUint32(i * 8, false) & OFF_HI) * 0x1_0000_0000 +
      (l1v.getUint32(i * 8 + 4, false) & (~0x1ff >>> 0));
    if (l2Off === 0) continue;
    out.add(l2Off / cs);
    await b.read(l2Off, l2);
    for (let j = 0; j < cs / 8; j++) {
      const hi = l2v.getUint32(j * 8, false);
      expect(hi & 0x4000_0000).toBe(0); // not compressed
      const off =
        (hi & OFF_HI) * 0x1_0000_0000 + ((l2v.getUint32(j * 8 + 4, false) & ~0x1ff) >>> 0);
      if (off !== 0) out.add(off / cs);
    }
  }
  return out;
}

function qemuCheck(path: string): {
  leaks: number;
  corruptions: number;
  status: number | null;
  json: Record<string, unknown>;
} {
  const r = spawnSync("qemu-img", ["check", "--output=json", "-f", "qcow2", path], {
    encoding: "utf8",
    maxBuffer: 256 * 1024 * 1024,
  });
  const json = JSON.parse(r.stdout) as Record<string, unknown>;
  return {
    leaks: (json["leaks"] as number | undefined) ?? 0,
    corruptions:
      ((json["corruptions"] as number | undefined) ?? 0) +
      ((json["check-errors"] as number | undefined) ?? 0),
    status: r.status,
    json,
  };
}

describe.skipIf(!available)("qemu interop", () => {
  const dir = mkdtempSync(join(tmpdir(), "qimg-refcount-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  function makeQemuImage(bits: number, name: string): string {
    const path = join(dir, name);
    execFileSync("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      `refcount_bits=${bits},cluster_size=512`,
      path,
      "4M",
    ]);
    execFileSync("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "write -P 0x5a 0 64k",
      "-c",
      "write -P 0x11 1M 3k",
      "-c",
      "write -P 0x22 3584k 512",
      path,
    ]);
    return path;
  }

  async function open(path: string, h: Header, backend: FileBackend): Promise<Refcounts> {
    const cs = 2 ** h.clusterBits;
    return Refcounts.open({
      backend,
      cache: new ClusterCache({ backend, tableSize: cs, capacity: 16, name: "refcount" }),
      clusterBits: h.clusterBits,
      refcountOrder: h.refcountOrder,
      tableOffset: h.tableOffset,
      tableClusters: h.tableClusters,
      onTableMoved: async (o, n) => {
        const b = new Uint8Array(12);
        const v = new DataView(b.buffer);
        v.setUint32(0, Math.floor(o / 0x1_0000_0000), false);
        v.setUint32(4, o >>> 0, false);
        v.setUint32(8, n, false);
        await backend.write(48, b);
        await backend.flush();
      },
    });
  }

  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    it(`reads refcount_bits=${bits} images written by qemu-io`, async () => {
      const path = makeQemuImage(bits, `read-${bits}.qcow2`);
      const backend = await FileBackend.open(path, { readOnly: true });
      try {
        const h = await readHeader(backend);
        expect(h.clusterBits).toBe(9);
        expect(1 << h.refcountOrder).toBe(bits);
        const rc = await open(path, h, backend);
        expect(rc.readOnly).toBe(true);
        const { counts, metadata } = await walk(rc); // header, table and blocks: refcount 1
        expect(await rc.get(0)).toBe(1);
        const refs = await referenced(backend, h);
        expect(refs.size).toBeGreaterThan(128 + 6);
        for (const c of refs) expect(counts.get(c), `cluster ${c}`).toBe(1);
        // Nothing else is counted: used = referenced + refcount structures.
        for (const [c] of counts) expect(refs.has(c) || metadata.has(c), `cluster ${c}`).toBe(true);
      } finally {
        await backend.close();
      }
    });

    it(`qemu-img check accepts blocks and tables grown here (refcount_bits=${bits}), reporting only the leaks`, async () => {
      const path = makeQemuImage(bits, `grow-${bits}.qcow2`);
      const backend = await FileBackend.open(path);
      let allocated = 0;
      let moved = false;
      try {
        const h = await readHeader(backend);
        const cs = 2 ** h.clusterBits;
        const rc = await open(path, h, backend);
        const tableBefore = rc.tableOffset;
        // Cross refcount block boundaries, and for wide entries the table's capacity too.
        const target =
          bits >= 32
            ? rc.tableEntries * rc.entriesPerBlock + 50
            : Math.min(rc.tableEntries * rc.entriesPerBlock, 3 * rc.entriesPerBlock) + 50;
        let last = 0;
        while (allocated < target) {
          const n = 1 + (allocated % 37);
          const off = await rc.allocate(n);
          last = Math.max(last, off + n * cs);
          allocated += n;
        }
        moved = rc.tableOffset !== tableBefore;
        await rc.flush();
        // qemu-img check only counts clusters inside the file: make the allocations part of it,
        // as a driver writing data there would.
        if ((await backend.size()) < last) await backend.truncate(last);
        await backend.flush();
      } finally {
        await backend.close();
      }
      const res = qemuCheck(path);
      expect(res.corruptions, JSON.stringify(res.json)).toBe(0);
      expect(res.leaks, JSON.stringify(res.json)).toBe(allocated);
      expect(res.status).toBe(3); // leaks only
      if (bits >= 32) expect(moved).toBe(true);
      // And qemu-img can repair exactly those leaks.
      spawnSync("qemu-img", ["check", "-r", "leaks", "-f", "qcow2", path], { stdio: "ignore" });
      expect(qemuCheck(path).status).toBe(0);
    });
  }
});
