/**
 * QEMU iotest 261 ported (its check verdicts): snapshot table entries with unusual extra data
 * (none, only the VM state size, unknown bytes), a v2 image forced to v3 whose entries are
 * too short for v3, too much extra data in one entry (more snapshots than QEMU reads and
 * tables past its 64 MiB limit: iotest-261-limits.test.ts). Images are made by qemu-img, their snapshot
 * tables rewritten here, and checked by qemu-img and by us on twins.
 */
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { haveQemu } from "./helpers.js";
import {
  be64,
  create,
  expectSameGuest,
  expectSameReadOnly,
  expectSameRepair,
  peek,
  poke,
  qemuIo,
  run,
  sameRepairAll,
  scratch,
} from "./iotest-helpers.js";

const SIZE = 64 * 1024 * 1024 - 4097;

interface Entry {
  /** The 40 fixed bytes. */
  fixed: Uint8Array;
  extra: Uint8Array;
  /** ID and name bytes. */
  idName: Uint8Array;
}

const pad8 = (n: number): number => Math.ceil(n / 8) * 8;

/** The snapshot table entries of an image. */
function readEntries(f: string): Entry[] {
  const file = readFileSync(f);
  const count = peek(f, 60, 4);
  let at = peek(f, 64, 8);
  const out: Entry[] = [];
  for (let i = 0; i < count; i++) {
    const dv = new DataView(file.buffer, file.byteOffset + at);
    const idLen = dv.getUint16(12);
    const nameLen = dv.getUint16(14);
    const extraLen = dv.getUint32(36);
    out.push({
      fixed: file.subarray(at, at + 40).slice(),
      extra: file.subarray(at + 40, at + 40 + extraLen).slice(),
      idName: file.subarray(at + 40 + extraLen, at + 40 + extraLen + idLen + nameLen).slice(),
    });
    at += pad8(40 + extraLen + idLen + nameLen);
  }
  return out;
}

/** Write entries back over the table (same place; the table must still fit its clusters). */
function writeEntries(f: string, entries: readonly Entry[]): void {
  const parts: Uint8Array[] = [];
  for (const e of entries) {
    new DataView(e.fixed.buffer, e.fixed.byteOffset).setUint32(36, e.extra.byteLength);
    const len = 40 + e.extra.byteLength + e.idName.byteLength;
    const b = new Uint8Array(pad8(len));
    b.set(e.fixed, 0);
    b.set(e.extra, 40);
    b.set(e.idName, 40 + e.extra.byteLength);
    parts.push(b);
  }
  const file = readFileSync(f);
  let at = peek(f, 64, 8);
  for (const p of parts) {
    file.set(p, at);
    at += p.byteLength;
  }
  writeFileSync(f, file);
}

/** A v2 image with three snapshots whose extra data is none, 42 bytes (unknown tail), 8 bytes. */
function v2Template(dir: string): string {
  const f = join(dir, "v2.qcow2");
  create(f, SIZE, "compat=0.10");
  qemuIo(f, "write -P 4 1000 70000");
  for (const sn of ["sn0", "sn1", "sn2"]) run("qemu-img", ["snapshot", "-c", sn, f]);
  qemuIo(f, "write -P 5 3000 5000");
  const [sn0, sn1, sn2] = readEntries(f) as [Entry, Entry, Entry];
  sn0.extra = new Uint8Array(0);
  const extra1 = new Uint8Array(42);
  extra1.set(sn1.extra.subarray(0, 16));
  extra1.set(new TextEncoder().encode("our own unknown data"), 16);
  sn1.extra = extra1;
  sn2.extra = sn2.extra.slice(0, 8);
  writeEntries(f, [sn0, sn1, sn2]);
  return f;
}

/** Read-only, -r leaks and -r all verdicts on twins; the same guest data after -r all. */
async function allVerdicts(path: string): Promise<void> {
  await expectSameReadOnly(path);
  await expectSameRepair(path, "leaks");
  const { q, ours } = await expectSameRepair(path, "all");
  expectSameGuest(q, ours);
}

describe("iotest 261: snapshot table extra data", () => {
  it("v2 template (no extra data, unknown extra data, only the VM state size) is clean", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    await allVerdicts(v2Template(scratch("261")));
  });

  it("upgraded to v3 by qemu-img amend: clean", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = v2Template(scratch("261"));
    run("qemu-img", ["amend", "-o", "compat=1.1", f]);
    await allVerdicts(f);
  });

  it("forced to v3 by poking the header: entries 0 and 2 are incomplete", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = v2Template(scratch("261"));
    poke(f, 4, [0, 0, 0, 3]);
    poke(f, 100, [0, 0, 0, 0x68]);
    poke(f, 96, [0, 0, 0, 4]);
    await allVerdicts(f);
  });
});

describe("leaked snapshot table", () => {
  it("the header forgets the snapshots: their table, L1 tables and shared clusters leak", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("261"), "t.qcow2");
    create(f, SIZE);
    qemuIo(f, "write -P 1 0 100000");
    run("qemu-img", ["snapshot", "-c", "a", f]);
    qemuIo(f, "write -P 2 50000 100000");
    run("qemu-img", ["snapshot", "-c", "b", f]);
    poke(f, 60, [0, 0, 0, 0, ...be64(0n)]);
    await allVerdicts(f);
  });
});

describe("snapshot L1 tables out of bounds or unaligned (the check's side of 261/080)", () => {
  /** A v3 image with two snapshots; `damage` gets the file and the second entry's offset. */
  async function damaged(damage: (f: string, entry: number) => void): Promise<string> {
    const f = join(scratch("261"), "t.qcow2");
    create(f, SIZE);
    qemuIo(f, "write -P 1 0 100000");
    run("qemu-img", ["snapshot", "-c", "a", f]);
    qemuIo(f, "write -P 2 50000 100000");
    run("qemu-img", ["snapshot", "-c", "b", f]);
    qemuIo(f, "write -P 3 70000 3333");
    const [first] = readEntries(f) as [Entry];
    const entry = peek(f, 64, 8) + pad8(40 + first.extra.byteLength + first.idName.byteLength);
    damage(f, entry);
    return f;
  }
  const cases: Record<string, (f: string, entry: number) => void> = {
    "L1 offset not cluster aligned": (f, e) => poke(f, e + 6, [0x02, 0x00]),
    "L1 offset past the end of the file": (f, e) => poke(f, e, [0, 0, 0, 0, 0x10, 0, 0, 0]),
    "L1 size above QEMU's limit": (f, e) => poke(f, e + 8, [0x00, 0x80, 0x00, 0x00]),
    "L1 size larger than the table": (f, e) => poke(f, e + 8, [0x00, 0x00, 0x01, 0x00]),
    // The entries then read as zeros: incomplete for v3, -r all writes a completed table.
    "snapshot table past the end of the file": (f) =>
      poke(f, 64, be64(BigInt(Math.ceil(statSync(f).size / 65536) * 65536 + 3 * 65536))),
  };
  for (const [name, damage] of Object.entries(cases)) {
    it(name, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      await allVerdicts(await damaged(damage));
    });
  }
});

describe("iotest 261: too much extra data in a snapshot table entry", () => {
  it("extra_data_size 65536 on the last of four: check fails as qemu-img's; -r all cuts it to 1 KiB as qemu-img", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = v2Template(scratch("261"));
    run("qemu-img", ["amend", "-o", "compat=1.1", f]);
    run("qemu-img", ["snapshot", "-c", "sn3", f]);
    const entries = readEntries(f);
    let at = peek(f, 64, 8);
    for (const e of entries.slice(0, 3)) at += pad8(40 + e.extra.byteLength + e.idName.byteLength);
    // 64 KiB of extra data: the entry now spills into the next cluster (a refcount error too).
    poke(f, at + 36, [0, 1, 0, 0]);
    // Normal opens keep refusing it, as qemu-img info does.
    expect(run("qemu-img", ["info", f], true).status).toBe(1);
    const r = await expectSameReadOnly(f);
    expect(r.failure).toBe("File too large");
    await expectSameRepair(f, "leaks");
    const { ours } = await sameRepairAll(f);
    expect(readEntries(ours).map((e) => e.extra.byteLength)).toEqual([24, 42, 24, 1024]);
  });
});
