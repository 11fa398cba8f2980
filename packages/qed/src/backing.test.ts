import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { createQed } from "./create.js";
import { openQed } from "./image.js";
import { planQedBackingChange } from "./backing.js";
import { QED_F_BACKING_FILE, QED_F_BACKING_FORMAT_NO_PROBE } from "./spec/constants.js";
import { LONG, prng } from "./testing/util.js";

function name(r: () => number, max: number): string {
  const chars = "abcdefghijklmnopqrstuvwxyz0123456789._-/";
  let s = "";
  const len = 1 + Math.floor(r() * max);
  for (let i = 0; i < len; i++) s += chars[Math.floor(r() * chars.length)];
  return s;
}

async function image(backing: string | undefined, clusterSize = 4096): Promise<MemoryBackend> {
  const m = new MemoryBackend();
  await createQed(m, {
    size: 1_000_000,
    clusterSize,
    ...(backing === undefined ? {} : { backingFile: backing, backingFormat: "raw" }),
  });
  return m;
}

describe("planQedBackingChange", () => {
  it("records raw as the no-probe bit, other formats not at all, and none clears both bits", async () => {
    const img = await openQed(await image("old"), { noBacking: true });
    const h = img.header;
    await img.close();
    const raw = planQedBackingChange(h, { filename: "b", format: "raw" }).header;
    expect(raw.features & QED_F_BACKING_FORMAT_NO_PROBE).toBe(QED_F_BACKING_FORMAT_NO_PROBE);
    const q = planQedBackingChange(h, { filename: "b", format: "qcow2" }).header;
    expect(q.features & QED_F_BACKING_FORMAT_NO_PROBE).toBe(0n);
    expect(q.features & QED_F_BACKING_FILE).toBe(QED_F_BACKING_FILE);
    const none = planQedBackingChange(h, { filename: undefined });
    expect(none.header.features & (QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE)).toBe(0n);
    expect(none.name).toBeUndefined();
  });

  it("refuses a name that does not fit the header clusters, and unknown compat features", async () => {
    const img = await openQed(await image(undefined), { noBacking: true });
    const h = img.header;
    await img.close();
    const area = h.headerSize * h.clusterSize;
    expect(() => planQedBackingChange(h, { filename: "x".repeat(area) })).toThrow(/No space/);
    expect(() => planQedBackingChange({ ...h, compatFeatures: 1n }, { filename: "b" })).toThrow(
      /not supported/,
    );
  });
});

describe("QedImage.changeBackingFile survives a power loss after any write", () => {
  const runs = LONG ? 400 : 60;
  it(`${runs} seeded runs`, async () => {
    for (let seed = 1; seed <= runs; seed++) {
      const r = prng(seed);
      const oldName = r() < 0.8 ? name(r, r() < 0.3 ? 1500 : 40) : undefined;
      const mem = await image(oldName);
      const data = new Uint8Array(50_000).map((_, i) => (i * 13 + seed) & 255);
      {
        const img = await openQed(mem, { readOnly: false, noBacking: true });
        await img.write(7_777, data);
        await img.close();
      }
      const x = r();
      const change =
        x < 0.2
          ? { filename: undefined }
          : { filename: name(r, r() < 0.3 ? 2000 : 40), format: r() < 0.5 ? "raw" : "qcow2" };
      let ops = 0;
      const lossAt = Math.floor(r() * 6);
      const fault = await FaultBackend.wrap(MemoryBackend.from(mem.bytes()), {
        failWhen: (op) => (op === "write" || op === "flush") && ++ops > lossAt,
      });
      try {
        const img = await openQed(fault, { readOnly: false, noBacking: true });
        await img.changeBackingFile(change);
        await img.close();
      } catch {
        // The power is gone.
      }
      const after = fault.powerLoss({ tearLastWrite: r() < 0.5, seed });
      const img = await openQed(after, { noBacking: true });
      const info = img.info();
      const named = [info.backingFilename, info.backingFormat];
      const olds = [oldName, oldName === undefined ? undefined : "raw"];
      const news = [
        change.filename,
        change.filename !== undefined && change.format === "raw" ? "raw" : undefined,
      ];
      expect([olds, news], `seed ${seed} (loss after ${lossAt})`).toContainEqual(named);
      const back = new Uint8Array(data.length);
      await img.read(7_777, back);
      expect(Buffer.compare(back, data), `seed ${seed}: data`).toBe(0);
      await img.close();
    }
  }, 600_000);
});
