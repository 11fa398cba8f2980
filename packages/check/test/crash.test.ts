import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { fixturePath } from "@qimg/fixtures";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { checkQcow2 } from "../src/index.js";
import { haveQemu, prng, qemuCheck } from "./helpers.js";

const LONG = process.env.QIMG_LONG === "1";
const SEED =
  process.env.QIMG_SEED !== undefined
    ? Number(process.env.QIMG_SEED)
    : (Math.random() * 2 ** 32) >>> 0;

const IMAGES = [
  "qcow2-broken-leak-refcount-high",
  "qcow2-broken-refcount-zero",
  "qcow2-broken-l2-past-eof",
  "qcow2-broken-l2-overlaps-refcount-table",
  "qcow2-broken-l1-misaligned",
  "qcow2-lazy-refcounts-dirty",
];

/** Writes, flushes and truncates a full `repair: "all"` of the image does. */
async function countOps(bytes: Uint8Array): Promise<number> {
  let n = 0;
  const fb = await FaultBackend.wrap(MemoryBackend.from(bytes.slice()), {
    failWhen: (op) => {
      if (op !== "read") n++;
      return false;
    },
  });
  await checkQcow2(fb, { repair: "all" });
  return n;
}

describe(`power loss during repair -r all (seed ${SEED}${LONG ? ", long" : ""})`, () => {
  for (const name of IMAGES) {
    it(name, async () => {
      const bytes = new Uint8Array(readFileSync(fixturePath(name)));
      const total = await countOps(bytes);
      expect(total).toBeGreaterThan(0);
      const rand = prng(SEED ^ name.length);
      const cuts = LONG
        ? Array.from({ length: total + 1 }, (_, i) => i)
        : Array.from({ length: 4 }, () => Math.floor(rand() * (total + 1)));
      const qemu = haveQemu();
      for (const cut of cuts) {
        const tearSeed = (rand() * 2 ** 32) >>> 0;
        const where = `${name}: cut after op ${cut}/${total}, tear seed ${tearSeed} (QIMG_SEED=${SEED})`;
        let n = 0;
        const fb = await FaultBackend.wrap(MemoryBackend.from(bytes.slice()), {
          failWhen: (op) => op !== "read" && ++n > cut,
        });
        await checkQcow2(fb, { repair: "all" }).catch(() => undefined);
        const survivor = fb.powerLoss({ tearLastWrite: true, seed: tearSeed });
        const second = await checkQcow2(survivor, { repair: "all" });
        expect(second.exitCode, where).toBe(0);
        const third = await checkQcow2(survivor);
        expect(third.exitCode, where).toBe(0);
        if (qemu) {
          const file = join(tmpdir(), `qimg-crash-${process.pid}-${name}.qcow2`);
          writeFileSync(file, survivor.bytes());
          try {
            const q = qemuCheck(file);
            expect(q.status, `${where}\n${q.stderr}${q.stdout}`).toBe(0);
          } finally {
            rmSync(file, { force: true });
          }
        }
      }
    });
  }
});
