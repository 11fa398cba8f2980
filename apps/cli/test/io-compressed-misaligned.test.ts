/**
 * `qimg io -c 'write -c OFFSET COUNT'` against qemu-io on twin images with a persistent dirty
 * bitmap (granularity 512): the same output line and exit code, and the same dirty ranges
 * afterwards (read by QEMU itself: qemu-nbd -B + qemu-img map x-dirty-bitmap). qemu-io refuses
 * offsets and counts that are not multiples of 512 before the request starts (nothing dirty);
 * a request that is sector- but not cluster-aligned reaches the driver, which marks the range
 * dirty and then fails with EINVAL; a request past the end fails (EIO) without marking.
 */
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { afterAll, describe, expect, it } from "vitest";
import { qemuDirtyRanges } from "../../../packages/qcow2/test/bitmap-oracle.js";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

const haveNbd = spawnSync("qemu-nbd", ["--version"]).status === 0;
if (!hasQemu) console.log("skipping write -c bitmap tests: qemu-img is not on PATH");
else if (!haveNbd) console.log("skipping write -c bitmap tests: qemu-nbd is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-io-wc-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** First output line, without qemu-io's timing line. */
const firstLine = (s: string): string => s.split("\n")[0] ?? "";

describe.skipIf(!hasQemu || !haveNbd)("write -c that does not cover whole clusters", () => {
  it("marks the bitmap and fails exactly as qemu-io does", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
    const rnd = prng(seed);
    const cs = 4096;
    const size = 100000 + Math.floor(rnd() * 40) * 511; // not a multiple of 512 or 4096
    const base = join(tmp, "base.qcow2");
    expect(
      qemuImg(["create", "-q", "-f", "qcow2", "-o", `cluster_size=${cs}`, base, String(size)]).code,
    ).toBe(0);
    expect(qemuImg(["bitmap", "--add", "-g", "512", base, "b0"]).code).toBe(0);
    const sector = (n: number): number => n * 512;
    const cases = [
      "write -c 1024 4096", // the brief's case: sector- but not cluster-aligned
      `write -c ${sector(1 + Math.floor(rnd() * 7))} ${sector(1 + Math.floor(rnd() * 20))}`,
      `write -c ${cs * 3} ${sector(3)}`, // aligned start, short count
      `write -c ${cs * 2} ${cs + 512}`, // aligned start, one cluster and a bit
      "write -c 1000 4096", // offset not a multiple of 512
      "write -c 0 6000", // count not a multiple of 512
      `write -c ${cs * 4} ${cs * 2}`, // whole clusters: written
      `write -c ${sector(Math.floor(size / 512) - 1)} 4096`, // past the end
      "write -c 0 0",
    ];
    let n = 0;
    for (const cmd of cases) {
      const what = `seed ${seed}, size ${size}: ${cmd}`;
      const q = join(tmp, `q${n}.qcow2`);
      const o = join(tmp, `o${n}.qcow2`);
      n++;
      copyFileSync(base, q);
      copyFileSync(base, o);
      const theirs = qemuIo(["-f", "qcow2", "-c", cmd, q]);
      const ours = await qimg(["io", "-f", "qcow2", "-c", cmd, o]);
      expect(ours.code, `${what}: ${ours.stdout}${ours.stderr}`).toBe(theirs.code);
      expect(firstLine(ours.stdout), what).toBe(firstLine(theirs.stdout));
      const qd = await qemuDirtyRanges(q, ["b0"], tmp);
      const od = await qemuDirtyRanges(o, ["b0"], tmp);
      expect(od.get("b0"), what).toEqual(qd.get("b0"));
      const cmp = qemuImg(["compare", q, o]);
      expect(cmp.code, `${what}: ${cmp.stdout}`).toBe(0);
    }
  }, 60_000);

  it("QED has no compressed writes: Operation not supported, as qemu-io", async () => {
    const f = join(tmp, "z.qed");
    expect(qemuImg(["create", "-q", "-f", "qed", f, "1000448"]).code).toBe(0);
    const theirs = qemuIo(["-f", "qed", "-c", "write -c 0 64k", f]);
    const ours = await qimg(["io", "-f", "qed", "-c", "write -c 0 64k", f]);
    expect(ours.code).toBe(theirs.code);
    expect(firstLine(ours.stdout)).toBe(firstLine(theirs.stdout));
  });
});
