/**
 * Differential finding F7: `convert -o backing_file=B,backing_fmt=raw` to QED (and qcow2) from
 * a v2 qcow2 whose guest reads zeros over a range where the raw backing file B has data. The
 * convert zeroes those ranges explicitly after asking the new image where B has data, several
 * requests in flight; the raw driver's scan buffer was shared between them, so some answers
 * described other ranges and B's data stayed visible. The result must equal the source
 * (qemu-img compare), as qemu-img's own output does.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping convert -o backing_file tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-convert-backing-raw-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.skipIf(!hasQemu)("convert -o backing_file=<raw with zero runs>", () => {
  it("the output reads as the source (qemu-img compare), for QED and qcow2 targets", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
    const rnd = prng(seed);
    const rounds = process.env.QIMG_LONG === "1" ? 40 : 6;
    for (let round = 0; round < rounds; round++) {
      // A backing file with a few random data runs and zeros elsewhere (F7's shape).
      const size = 2676904;
      const base = new Uint8Array(size);
      for (let k = 1 + Math.floor(rnd() * 4); k > 0; k--) {
        const s = Math.floor(rnd() * size);
        const l = 1 + Math.floor(rnd() * (size - s));
        for (let i = s; i < s + l; i++) base[i] = 1 + Math.floor(rnd() * 255);
      }
      writeFileSync(join(tmp, "base.raw"), base);
      const q = join(tmp, "q.qcow2");
      rmSync(q, { force: true });
      const create = qemuImg(
        ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"].concat([
          "-o",
          "compat=0.10,cluster_size=4096",
          "q.qcow2",
          "2765410",
        ]),
        tmp,
      );
      expect(create.code, create.stderr).toBe(0);
      // (Past the last compressed write's clusters: QEMU refuses compressed data over data.)
      const zs = 360448 + 512 * Math.floor(rnd() * 3000);
      const zl = Math.min(1 + Math.floor(rnd() * 700000), 2765410 - zs);
      const ops = [
        "write -c -P 113 843776 8192",
        "write -P 235 540672 15360",
        "discard 2748416 3422",
        `write -z -u ${zs} ${zl}`,
        "write -c -P 22 348160 12288",
      ].flatMap((c) => ["-c", c]);
      const io = qemuIo(["-f", "qcow2", ...ops, "q.qcow2"], tmp);
      expect(io.code, `seed ${seed}: ${io.stdout}${io.stderr}`).toBe(0);
      for (const fmt of ["qed", "qcow2"]) {
        const what = `seed ${seed} round ${round} (write -z -u ${zs} ${zl}) -> ${fmt}`;
        const out = join(tmp, `co.${fmt}`);
        rmSync(out, { force: true });
        const r = await qimg(
          [
            "convert",
            "-f",
            "qcow2",
            "-O",
            fmt,
            "-o",
            "backing_file=base.raw,backing_fmt=raw",
          ].concat(["q.qcow2", `co.${fmt}`]),
          tmp,
        );
        expect(r.code, `${what}: ${r.stderr}`).toBe(0);
        const cmp = qemuImg(["compare", "-f", fmt, "-F", "qcow2", out, q]);
        expect(cmp.code, `${what}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
      }
    }
  }, 120_000);
});
