/**
 * A raw file whose size is not a multiple of 512 is seen as QEMU's block layer sees it: the size
 * rounded up to a whole sector, the missing tail reading as zeros. Before, qimg used the exact
 * file size, so `qimg compare` of such a file and its qcow2 copy warned of a size mismatch that
 * qemu-img does not see, and `qimg info` printed a different virtual size.
 */
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuInfo } from "./qemu.js";

const dir = mkdtempSync(join(tmpdir(), "qimg-raw-size-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.skipIf(!hasQemu)("raw files of any size, as qemu-img sees them", () => {
  const seed = Number(process.env.QIMG_SEED ?? 4242);
  const rnd = prng(seed);
  const sizes = [
    1,
    511,
    513,
    1000,
    65_537,
    3_146_241,
    ...Array.from({ length: 4 }, () => 1 + Math.floor(rnd() * 5_000_000)),
  ];
  for (const size of sizes) {
    it(`${size} bytes (seed ${seed})`, async () => {
      const raw = join(dir, `r${size}.raw`);
      const data = new Uint8Array(size);
      for (let i = 0; i < size; i++) data[i] = (i * 131 + size) & 0xff;
      writeFileSync(raw, data);
      const info = JSON.parse(
        (await qimg(["info", "--output=json", "-f", "raw", raw])).stdout,
      ) as Record<string, unknown>;
      expect(info["virtual-size"]).toBe(qemuInfo(raw, "raw")["virtual-size"]);
      const q = join(dir, `r${size}.qcow2`);
      expect(qemuImg(["convert", "-f", "raw", "-O", "qcow2", raw, q]).code).toBe(0);
      const ours = await qimg(["compare", "-f", "raw", "-F", "qcow2", raw, q]);
      const theirs = qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw, q]);
      expect({ code: ours.code, out: ours.stdout }).toEqual({
        code: theirs.code,
        out: theirs.stdout,
      });
      expect(statSync(raw).size).toBe(size); // reading never changes the file
    });
  }
});
