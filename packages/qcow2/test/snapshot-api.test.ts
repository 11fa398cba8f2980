/**
 * The snapshot API's rules without qemu-img (src/snapshot.ts): how selectors resolve (QEMU's
 * find_snapshot_by_id_and_name / _by_id_or_name), how IDs are picked, what read-only opens
 * and external data files refuse, the limits, and the read-only view's size.
 */
import { describe, expect, it } from "vitest";
import { MemoryBackend } from "@qimg/io";
import {
  MAX_SNAPSHOT_STRING_BYTES,
  createQcow2,
  encodeSnapshotTable,
  findSnapshot,
  findSnapshotByIdOrName,
  newSnapshotId,
  openQcow2,
  openQcow2Snapshot,
  writeHeaderFields,
} from "../src/index.js";
import type { Qcow2Image, SnapshotEntry } from "../src/index.js";

const entry = (id: string, name: string): SnapshotEntry => ({
  l1TableOffset: 0,
  l1Size: 0,
  id,
  name,
  dateSec: 0,
  dateNsec: 0,
  vmClockNsec: 0n,
  vmStateSize: 0,
  diskSize: 0,
  icount: 0n,
  extraData: new Uint8Array(24),
  offset: 0,
});

async function fresh(size = 1 << 20, options = {}): Promise<MemoryBackend> {
  const mem = new MemoryBackend();
  await createQcow2(mem, { size, ...options });
  return mem;
}

/**
 * A fresh 1 MiB image whose header points at `table` (`count` encoded snapshot entries),
 * written past the end of the file, opened read-write; `before` is its bytes at the open.
 */
async function withSnapshotTable(
  table: Uint8Array,
  count: number,
): Promise<{ rw: Qcow2Image; back: MemoryBackend; before: Uint8Array }> {
  const mem = await fresh(1 << 20);
  const image = await openQcow2(mem);
  const header = image.header;
  await image.close();
  const at = Math.ceil(mem.bytes().byteLength / 65536) * 65536;
  const big = MemoryBackend.from(mem.bytes().slice());
  await big.write(at, table);
  await writeHeaderFields(big, header, { nbSnapshots: count, snapshotsOffset: at });
  const before = big.bytes().slice();
  const back = MemoryBackend.from(before.slice());
  return { rw: await openQcow2(back, { readOnly: false }), back, before };
}

describe("selectors and IDs", () => {
  const list = [entry("1", "2"), entry("2", "x"), entry("7", "x")];
  it("a string is an ID first, else the first name", () => {
    expect(findSnapshotByIdOrName(list, "2")).toBe(1);
    expect(findSnapshotByIdOrName(list, "x")).toBe(1);
    expect(findSnapshotByIdOrName(list, "7")).toBe(2);
    expect(findSnapshotByIdOrName(list, "nope")).toBe(-1);
  });
  it("{ id, name } must match both when both are given", () => {
    expect(findSnapshot(list, { name: "2" })).toBe(0);
    expect(findSnapshot(list, { id: "7", name: "x" })).toBe(2);
    expect(findSnapshot(list, { id: "1", name: "x" })).toBe(-1);
    expect(findSnapshot(list, {})).toBe(-1);
  });
  it("a new ID is the largest numeric ID + 1 (strtoul of each)", () => {
    expect(newSnapshotId([])).toBe("1");
    expect(newSnapshotId(list)).toBe("8");
    expect(newSnapshotId([entry("abc", "a"), entry("12x", "b"), entry(" 3", "c")])).toBe("13");
  });
});

describe("snapshot operations on an in-memory image", () => {
  it("create, view, apply and delete keep each snapshot's bytes", async () => {
    const mem = await fresh(3 * 65536 + 512);
    const image = await openQcow2(mem, { readOnly: false });
    await image.write(0, new Uint8Array(70_000).fill(1));
    const a = await image.createSnapshot("a", { dateSec: 5, dateNsec: 6000 });
    expect([a.id, a.name, a.dateSec, a.dateNsec, a.diskSize, a.icount]).toEqual([
      "1",
      "a",
      5,
      6000,
      3 * 65536 + 512,
      0n,
    ]);
    expect(a.extraData.byteLength).toBe(24);
    await image.write(100, new Uint8Array(10).fill(2));
    await image.resize(4 * 65536);
    const view = await openQcow2Snapshot(image, "a");
    expect(view.virtualSize).toBe(3 * 65536 + 512);
    expect((await image.openSnapshot({ id: "1" }, { size: "image" })).virtualSize).toBe(4 * 65536);
    const b = new Uint8Array(200);
    await view.read(0, b);
    expect(b.every((x) => x === 1)).toBe(true);
    expect((await view.blockStatus(0, 65536)).data).toBe(true);
    await view.close();
    await expect(view.read(0, b)).rejects.toThrow();
    await image.applySnapshot("a");
    expect(image.virtualSize).toBe(3 * 65536 + 512);
    await image.read(0, b);
    expect(b.every((x) => x === 1)).toBe(true);
    await image.deleteSnapshot({ name: "a" });
    expect(image.snapshots).toEqual([]);
    await image.close();
  });

  it("requests issued around a create land wholly before or after it, in issue order", async () => {
    const cs = 4096;
    const mem = await fresh(64 * cs, { clusterSize: cs });
    const image = await openQcow2(mem, { readOnly: false });
    const region = (k: number): [number, Uint8Array] => [
      k * 3 * cs + 100,
      new Uint8Array(2 * cs).fill(k + 1),
    ];
    const before = Array.from({ length: 10 }, (_, k) => image.write(...region(k)));
    const snap = image.createSnapshot("mid");
    const after = Array.from({ length: 10 }, (_, k) => image.write(...region(k + 10)));
    const overwrite = Array.from({ length: 10 }, (_, k) =>
      image.write(region(k)[0], new Uint8Array(2 * cs).fill(99)),
    );
    await Promise.all([...before, snap, ...after, ...overwrite]);
    const view = await image.openSnapshot("mid");
    const b = new Uint8Array(2 * cs);
    for (let k = 0; k < 20; k++) {
      await view.read(region(k)[0], b);
      expect(
        b.every((x) => x === (k < 10 ? k + 1 : 0)),
        `snapshot region ${k}`,
      ).toBe(true);
      await image.read(region(k)[0], b);
      expect(
        b.every((x) => x === (k < 10 ? 99 : k + 1)),
        `active region ${k}`,
      ).toBe(true);
    }
    await image.close();
  });

  it("refuses what QEMU refuses, before changing anything", async () => {
    const mem = await fresh();
    const before = mem.bytes().slice();
    const ro = await openQcow2(mem);
    await expect(ro.createSnapshot("x")).rejects.toMatchObject({ code: "QIMG_READ_ONLY" });
    await expect(ro.openSnapshot("x")).rejects.toThrow(/Can't find the snapshot/);
    await ro.close();
    const mem2 = MemoryBackend.from(before.slice());
    const rw = await openQcow2(mem2, { readOnly: false });
    await expect(rw.applySnapshot("x")).rejects.toThrow(/Can't find the snapshot/);
    await expect(rw.deleteSnapshot({ id: "1" })).rejects.toThrow(/Can't find the snapshot/);
    await expect(rw.createSnapshot("n".repeat(MAX_SNAPSHOT_STRING_BYTES + 1))).rejects.toThrow(
      /longer than 65535 bytes/,
    );
    await rw.close();
    expect(Buffer.compare(mem2.bytes(), before)).toBe(0);
  });

  it("an image with 65536 snapshots takes no more (EFBIG), and nothing is written", async () => {
    const table = encodeSnapshotTable(
      Array.from({ length: 65536 }, (_, i) => entry(String(i + 1), `n${i}`)),
    );
    const { rw, back, before } = await withSnapshotTable(table, 65536);
    expect(rw.snapshots).toHaveLength(65536);
    await expect(rw.createSnapshot("one too many")).rejects.toMatchObject({
      cause: { code: "EFBIG" },
    });
    await rw.close();
    expect(Buffer.compare(back.bytes(), before)).toBe(0);
  });

  it("a snapshot table past 64 MiB is refused (EFBIG), and nothing is written", async () => {
    const long = (i: number): string => `${i}`.padEnd(MAX_SNAPSHOT_STRING_BYTES, "n");
    const table = encodeSnapshotTable(
      Array.from({ length: 1022 }, (_, i) => entry(String(i + 1), long(i))),
    );
    expect(table.byteLength).toBeLessThan(64 * 1024 * 1024);
    const { rw, back, before } = await withSnapshotTable(table, 1022);
    await expect(rw.createSnapshot(long(5000))).rejects.toMatchObject({
      cause: { code: "EFBIG" },
    });
    await rw.close();
    expect(Buffer.compare(back.bytes(), before)).toBe(0);
  });

  it("a refcount that would overflow refuses the snapshot and writes nothing", async () => {
    const mem = await fresh(1 << 20, { refcountBits: 1 });
    const rw = await openQcow2(mem, { readOnly: false });
    await rw.write(0, new Uint8Array(512).fill(9));
    await rw.flush();
    const before = mem.bytes().slice();
    await expect(rw.createSnapshot("s")).rejects.toMatchObject({ cause: { code: "EINVAL" } });
    expect(Buffer.compare(mem.bytes(), before)).toBe(0);
    await rw.close();
  });
});
