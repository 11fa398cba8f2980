/**
 * The table walk (walk.ts) on qemu-made images: the entries it visits agree with what
 * `qemu-img check --output=json` counts (allocated and compressed clusters of the active
 * table), cursors point where the entries are, and snapshots' tables are walked too.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { MemoryBackend } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { U64TableView } from "@qimg/structs";
import { requireQemu } from "@qimg/fixtures";
import { ClusterType, entryOffset } from "../src/spec/l2.js";
import { createQcow2, openQcow2 } from "../src/index.js";
import { readQcow2Metadata } from "../src/layout.js";
import { walkL1Table, walkTables } from "../src/walk.js";
import { describeOps, qemuImg, qemuIoOps, randomOps, tool } from "./twins.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping table walk tests: qemu-img is not on PATH");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-walk-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe.skipIf(!haveQemu)("walkTables", () => {
  for (const [seed, cs, extended] of [
    [71, 4096, false],
    [72, 65536, true],
    [73, 512, false],
  ] as const) {
    it(`visits what qemu-img check counts (seed ${seed}, cluster ${cs}, extended ${extended})`, async () => {
      const file = path.join(tmp, `w-${seed}.qcow2`);
      const size = 5 * 1024 * 1024 + 3 * 512 + 17;
      const o = `cluster_size=${cs}${extended ? ",extended_l2=on" : ""}`;
      const touched = new Set<number>();
      const before = randomOps(seed, size, cs, 30, { compressed: true, touched });
      expect(qemuImg(["create", "-q", "-f", "qcow2", "-o", o, file, String(size)]).code).toBe(0);
      const io1 = qemuIoOps(file, before, tmp);
      expect(io1.code, `${io1.stdout}${io1.stderr}`).toBe(0);
      expect(qemuImg(["snapshot", "-c", "s1", file]).code).toBe(0);
      const after = randomOps(seed + 1, size, cs, 30, { touched });
      expect(qemuIoOps(file, after, tmp).code).toBe(0);
      const q = JSON.parse(tool("qemu-img", ["check", "--output=json", file]).stdout) as {
        "allocated-clusters": number;
        "compressed-clusters"?: number;
      };
      const backend = await FileBackend.open(file, { readOnly: true });
      try {
        const m = await readQcow2Metadata(backend);
        expect(m.snapshots.length).toBe(1);
        const src = { backend, format: m.l2, fileSize: m.fileSize };
        let allocated = 0;
        let compressed = 0;
        const where = `seed ${seed}: ${describeOps([...before, ...after])}`;
        await walkL1Table(src, m.header.l1TableOffset, m.header.l1Size, undefined, {
          l2Entry: (c) => {
            const t = c.type;
            if (t === ClusterType.Normal || t === ClusterType.ZeroAlloc) allocated++;
            if (t === ClusterType.Compressed) {
              allocated++;
              compressed++;
            }
            // The cursor says where the entry is: re-read it from the file.
            const raw = new U64TableView(
              fs.readFileSync(file).subarray(c.entryOffset, c.entryOffset + 8),
              "big",
            );
            expect([raw.hi(0), raw.lo(0)], where).toEqual([c.hi, c.lo]);
            expect(c.entryOffset, where).toBe(c.tableOffset + c.word * 8);
            expect(c.word, where).toBe(c.index * m.l2.stride);
            expect(c.guestCluster, where).toBe(c.l1.index * m.l2.entriesPerTable + c.index);
          },
        });
        expect(allocated, where).toBe(q["allocated-clusters"]);
        expect(compressed, where).toBe(q["compressed-clusters"] ?? 0);
        // Both tables; the snapshot's L2 tables are visited under its index.
        const seen = new Set<string>();
        let l2Tables = 0;
        await walkTables(
          src,
          { offset: m.header.l1TableOffset, size: m.header.l1Size },
          m.snapshots,
          {
            l1Table: (c) => {
              seen.add(String(c.snapshot));
            },
            l1Entry: (c) => {
              expect(c.l2Offset).toBe(entryOffset(c.hi, c.lo));
              l2Tables++;
              return false; // not descending: no L2 entries visited
            },
            l2Entry: () => {
              throw new Error("l1Entry returned false: no L2 entries expected");
            },
          },
        );
        expect([...seen]).toEqual(["undefined", "0"]);
        expect(l2Tables).toBeGreaterThan(0);
      } finally {
        await backend.close();
      }
    });
  }
});

describe("walkL1Table with asynchronous callbacks", () => {
  it("awaits every l2Entry promise before the table is done, the table's last entry too", async () => {
    const cs = 4096;
    const per = cs / 8; // L2 entries per table
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 3 * per * cs + 5000, clusterSize: cs });
    const img = await openQcow2(mem, { readOnly: false, noBacking: true });
    // The first and last entries of the first two L2 tables, and one in the third.
    const clusters = [0, per - 1, per, 2 * per - 1, 2 * per + 7];
    for (const c of clusters) await img.write(c * cs, new Uint8Array(cs).fill(1 + (c % 250)));
    await img.close();
    const file = MemoryBackend.from(mem.bytes());
    const m = await readQcow2Metadata(file);
    const events: string[] = [];
    await walkL1Table(
      { backend: file, format: m.l2, fileSize: m.fileSize },
      m.header.l1TableOffset,
      m.header.l1Size,
      undefined,
      {
        l2Entry: async (c) => {
          const at = c.guestCluster;
          await new Promise((r) => setTimeout(r, 1));
          events.push(`entry ${at}`);
        },
        l2TableDone: (c) => {
          events.push(`done ${c.tableOffset > 0 ? "table" : "?"}`);
        },
      },
    );
    expect(events).toEqual([
      "entry 0",
      `entry ${per - 1}`,
      "done table",
      `entry ${per}`,
      `entry ${2 * per - 1}`,
      "done table",
      `entry ${2 * per + 7}`,
      "done table",
    ]);
  });
});
