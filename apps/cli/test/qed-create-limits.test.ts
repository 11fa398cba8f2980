/**
 * QED size limits as QEMU computes them. QEMU's largest virtual size for a cluster size and
 * table size is cluster_size * entries^2 in 64-bit arithmetic that wraps; for the biggest
 * combinations it wraps to 0, so qemu-img refuses every non-zero size there and refuses to open
 * an image that has one ("QED image size is invalid"). Over the whole option grid, `qimg create`
 * must accept exactly what `qemu-img create` accepts, what it makes must open in qemu-img when
 * qemu-img's own twin does, and qimg must refuse to open what QEMU refuses (finding F6 of the
 * differential suite: cluster_size=2M,table_size=16 was accepted and made an image QEMU
 * could not open).
 */
import { existsSync, mkdtempSync, openSync, rmSync, statSync, writeSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg } from "./qemu.js";

if (!hasQemu) console.log("skipping QED create-limit tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-qed-limits-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const CLUSTER_SIZES = Array.from({ length: 15 }, (_, i) => 4096 * 2 ** i); // 4 KiB .. 64 MiB
const TABLE_SIZES = [1, 2, 4, 8, 16];

/** QEMU's limit, computed independently of the code under test (powers of two: 2^(3c+2t-6)). */
function qemuLimit(cs: number, ts: number): bigint {
  const e = BigInt(Math.log2(cs)) * 3n + BigInt(Math.log2(ts)) * 2n - 6n;
  return e >= 64n ? 0n : 1n << e;
}

describe.skipIf(!hasQemu)("QED create limits against qemu-img", () => {
  it("accepts and refuses the same cluster_size/table_size/size combinations", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
    const rnd = prng(seed);
    let accepted = 0;
    let refused = 0;
    for (const cs of CLUSTER_SIZES) {
      for (const ts of TABLE_SIZES) {
        const limit = qemuLimit(cs, ts);
        // A size that is not a multiple of 512 (rounded up by both tools), zero, and the
        // boundary where the limit is small enough to try.
        // (Size 0 only where the L1 table QEMU writes out is at most 64 MiB.)
        const sizes = [1 + Math.floor(rnd() * 4 * 1024 * 1024)];
        if (cs * ts <= 64 * 1024 * 1024) sizes.push(0);
        if (limit > 0n && limit <= 1n << 40n) sizes.push(Number(limit), Number(limit) + 1);
        for (const size of sizes) {
          const what = `seed ${seed}: cluster_size=${cs},table_size=${ts} size ${size}`;
          const q = join(tmp, "q.qed");
          const o = join(tmp, "o.qed");
          rmSync(q, { force: true });
          rmSync(o, { force: true });
          const opts = `cluster_size=${cs},table_size=${ts}`;
          const qr = qemuImg(["create", "-q", "-f", "qed", "-o", opts, q, String(size)]);
          const or = await qimg(["create", "-q", "-f", "qed", "-o", opts, o, String(size)]);
          expect(or.code, `${what}: qimg ${or.stderr} / qemu-img ${qr.stderr}`).toBe(qr.code);
          if (qr.code !== 0) {
            refused++;
            // qemu-img leaves an empty file behind; qimg leaves nothing.
            expect(existsSync(o), what).toBe(false);
            expect(or.stderr.split("\n").length, what).toBe(2);
            continue;
          }
          accepted++;
          expect(statSync(o).size, what).toBe(statSync(q).size);
          // qemu-img opens qimg's image exactly when it opens its own (it cannot open any
          // table_size=1 image: its table-offset check rejects one-cluster tables).
          const qi = qemuImg(["info", "-U", q]);
          const oi = qemuImg(["info", "-U", o]);
          expect(oi.code, `${what}: ${oi.stderr}`).toBe(qi.code);
          rmSync(q, { force: true });
          rmSync(o, { force: true });
        }
      }
    }
    expect(accepted).toBeGreaterThan(100);
    expect(refused).toBeGreaterThan(20);
  }, 120_000);

  it("refuses to open an image whose size is above QEMU's wrapped limit, as qemu-img does", async () => {
    for (const [cs, ts] of [
      [2097152, 16],
      [4194304, 4],
      [67108864, 1],
    ] as const) {
      const f = join(tmp, `big-${cs}-${ts}.qed`);
      rmSync(f, { force: true });
      expect(
        qemuImg(["create", "-q", "-f", "qed", "-o", `cluster_size=${cs},table_size=${ts}`, f, "0"])
          .code,
      ).toBe(0);
      // Both tools open the size-0 image (except QEMU on table_size=1, see above).
      expect((await qimg(["info", f])).code).toBe(0);
      // Give it a non-zero size (image_size is the u64 at byte 48), as an older qimg did.
      const fd = openSync(f, "r+");
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(1959936n);
      writeSync(fd, b, 0, 8, 48);
      closeSync(fd);
      const qi = qemuImg(["info", f]);
      expect(qi.code).toBe(1);
      expect(qi.stderr).toMatch(/QED image size is invalid/);
      const oi = await qimg(["info", f]);
      expect(oi.code, oi.stdout).toBe(1);
      expect(oi.stderr).toMatch(/image_size 1959936 is larger than 0/);
      rmSync(f, { force: true });
    }
  });
});
