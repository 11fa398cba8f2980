/**
 * The L2 entry classifier (spec/l2.ts) against qemu-img map: qemu-io writes, zeroes (with and
 * without unmap), discards and compresses at random (seeded) offsets, then every subcluster's
 * type, decoded from the raw tables, must agree with what qemu-img map says about its bytes.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { U64TableView } from "@qimg/structs";
import { requireQemu } from "@qimg/fixtures";
import { IncompatibleFeatures, decodeHeader } from "../src/spec/header.js";
import {
  SubclusterType as S,
  entryOffset,
  l1ReservedBits,
  l2EntryProblem,
  l2Format,
  subclusterTypeAt,
} from "../src/spec/l2.js";
import { describeOps, qemuImg, qemuIoOps, qemuMap, randomOps } from "./twins.js";
import type { Op } from "./twins.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping classifier-vs-qemu-img map tests: qemu-img is not on PATH");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-l2class-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const SEEDS = process.env.QIMG_LONG === "1" ? 40 : 4;

describe.skipIf(!haveQemu)("L2 classifier agrees with qemu-img map", () => {
  for (const extended of [false, true]) {
    for (let n = 0; n < SEEDS; n++) {
      const seed = 1000 + n * 7919 + (extended ? 1 : 0);
      it(`extended_l2=${extended} seed ${seed}`, () => {
        const file = path.join(tmp, `img-${seed}.qcow2`);
        const cs = extended ? 65536 : 4096;
        const size = 3 * 1024 * 1024 + 4096 * 3 + 1536;
        const opts = `cluster_size=${cs}${extended ? ",extended_l2=on" : ""}`;
        expect(qemuImg(["create", "-q", "-f", "qcow2", "-o", opts, file, String(size)]).code).toBe(
          0,
        );
        // Every type at least once: a written cluster zeroed in place (zero-alloc), one zeroed
        // with unmap (zero-plain), a compressed one; then random operations.
        const fixed: Op[] = [
          { k: "write", off: 0, len: 4 * cs, seed },
          { k: "zero", off: cs, len: cs, unmap: false },
          { k: "zero", off: 2 * cs, len: cs, unmap: true },
          { k: "zero", off: 8 * cs, len: cs, unmap: true },
          { k: "compressed", off: 4 * cs, len: cs, seed },
        ];
        const ops = [
          ...fixed,
          ...randomOps(seed, size, cs, 40, {
            compressed: true,
            touched: new Set([0, 1, 2, 3, 4, 8]),
          }),
        ];
        const r = qemuIoOps(file, ops, tmp);
        expect(r.code, r.stderr).toBe(0);

        const bytes = fs.readFileSync(file);
        const h = decodeHeader(bytes.subarray(0, 4096));
        const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
        const fmt = l2Format({
          clusterBits: h.clusterBits,
          extendedL2: incompat.has("extendedL2"),
          hasDataFile: false,
        });
        expect(fmt.extendedL2).toBe(extended);
        const scSize = cs / fmt.subclusters;
        const l1 = new U64TableView(
          bytes.subarray(h.l1TableOffset, h.l1TableOffset + h.l1Size * 8),
          "big",
        );
        const map = qemuMap(file);
        const at = (g: number) => map.find((e) => e.start <= g && g < e.start + e.length)!;
        const where = `seed ${seed}: ${describeOps(ops)}`;
        for (let g = 0; g < size; g += scSize) {
          const i = Math.floor(g / cs / fmt.entriesPerTable);
          const j = Math.floor(g / cs) % fmt.entriesPerTable;
          const sc = Math.floor((g % cs) / scSize);
          expect(l1ReservedBits(l1.hi(i), l1.lo(i)), where).toBe(false);
          const l2Off = entryOffset(l1.hi(i), l1.lo(i));
          let type: number = S.UnallocatedPlain;
          let host = 0;
          if (l2Off !== 0) {
            const l2 = new U64TableView(bytes.subarray(l2Off, l2Off + cs), "big");
            const k = j * fmt.stride;
            expect(l2EntryProblem(fmt, l2.hi(k), l2.lo(k)), where).toBe(0);
            type = subclusterTypeAt(fmt, l2, j, sc);
            host = entryOffset(l2.hi(k), l2.lo(k)) + sc * scSize;
          }
          const e = at(g);
          const msg = `${where}\nguest ${g}: type ${type}, map ${JSON.stringify(e)}`;
          expect(type, msg).not.toBe(S.Invalid);
          const data = type === S.Normal || type === S.Compressed;
          expect(e.data, msg).toBe(data);
          if (type === S.ZeroPlain || type === S.ZeroAlloc) expect(e.zero, msg).toBe(true);
          if (type === S.Normal) expect(e.offset! + (g - e.start), msg).toBe(host);
          if (type === S.Compressed) expect(e.offset, msg).toBeUndefined();
        }
      });
    }
  }
});
