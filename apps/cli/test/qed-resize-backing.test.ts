/**
 * Growing a QED image whose backing file reaches past the old end: QEMU refuses ("Block driver
 * does not support requested flags": the grown area would show the backing file's data and QED
 * cannot zero it), qimg grew the image and the guest read the backing file's bytes there (the
 * differential suite's finding F3c). Twins: the same create and resize through qemu-img and
 * qimg, for a grid of old sizes, backing sizes and growths.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg } from "./qemu.js";

const dir = mkdtempSync(join(tmpdir(), "qimg-qed-resize-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.skipIf(!hasQemu)("QED resize over a backing file, as qemu-img", () => {
  const seed = Number(process.env.QIMG_SEED ?? 3301);
  const rnd = prng(seed);
  const base = join(dir, "base.raw");
  const baseSize = 1_409_024;
  const bytes = new Uint8Array(baseSize);
  for (let i = 0; i < baseSize; i++) bytes[i] = Math.floor(rnd() * 256);
  writeFileSync(base, bytes);
  const sector = (n: number): number => Math.floor(n / 512) * 512;
  const cases: Array<[number, number]> = [
    [1 << 20, 512],
    [1 << 20, 1 << 20],
    [baseSize, 512],
    [baseSize - 1024, 1024],
    [baseSize - 1024, 512],
    [2 << 20, 1 << 20],
    [1 << 20, 0],
    ...Array.from({ length: 5 }, (): [number, number] => [
      sector(512 + rnd() * 2_000_000),
      sector(rnd() * 1_000_000),
    ]),
  ];
  for (const [oldSize, grow] of cases) {
    it(`${oldSize} +${grow} over a ${baseSize}-byte backing file (seed ${seed})`, async () => {
      const q = join(dir, `q-${oldSize}-${grow}.qed`);
      const o = join(dir, `o-${oldSize}-${grow}.qed`);
      const mk = ["create", "-q", "-f", "qed", "-b", base, "-F", "raw"];
      expect(qemuImg([...mk, q, String(oldSize)]).code).toBe(0);
      expect((await qimg([...mk, o, String(oldSize)])).code).toBe(0);
      const before = readFileSync(o);
      const theirs = qemuImg(["resize", "-q", q, String(oldSize + grow)]);
      const ours = await qimg(["resize", "-q", o, String(oldSize + grow)]);
      expect(ours.code, ours.stderr).toBe(theirs.code);
      if (theirs.code !== 0) {
        expect(ours.stderr).toMatch(/Block driver does not support requested flags/);
        expect(readFileSync(o).equals(before)).toBe(true);
      }
      const cmp = qemuImg(["compare", q, o]);
      expect(cmp.stdout + cmp.stderr).toMatch(/Images are identical/);
      expect(qemuImg(["check", o]).code).toBe(0);
    });
  }
});
