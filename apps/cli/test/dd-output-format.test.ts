/**
 * `qimg dd -O qcow2|qed|raw` against `qemu-img dd`: the target is created with the output
 * format and the size qemu-img dd gives it (input size, or count*bs when smaller, minus
 * skip*bs; rounded up to 512), holds the same guest bytes, has the same `qemu-img info` facts
 * and passes `qemu-img check`; a skip past the end gives the same empty image and message;
 * a dd that fails leaves no output behind.
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuInfo, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping dd -O tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-dd-o-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function ok(r: { code: number; stdout: string; stderr: string }): void {
  if (r.code !== 0 || /error|failed/i.test(r.stdout)) throw new Error(r.stdout + r.stderr);
}

const SOURCES = ["src.qcow2", "src.qed", "odd.raw"];

describe.skipIf(!hasQemu)("dd -O against qemu-img dd", () => {
  beforeAll(() => {
    // 1000000 bytes: not a multiple of 512 or of a cluster.
    const rnd = prng(77);
    const cmds: string[] = [];
    for (let i = 0; i < 12; i++) {
      const off = Math.floor(rnd() * 1900) * 512;
      const len = Math.min(1000000 - off, 512 * (1 + Math.floor(rnd() * 150)));
      if (len > 0)
        cmds.push(rnd() < 0.3 ? `write -z ${off} ${len}` : `write -P ${1 + i} ${off} ${len}`);
    }
    for (const f of ["qcow2", "qed"]) {
      ok(qemuImg(["create", "-q", "-f", f, `src.${f}`, "1000000"], tmp));
      ok(qemuIo(["-f", f, ...cmds.flatMap((c) => ["-c", c]), `src.${f}`], tmp));
    }
    // A raw file of an odd size.
    const odd = new Uint8Array(777777);
    for (let i = 0; i < odd.length; i += 1000) odd[i] = (i / 1000) & 0xff;
    writeFileSync(join(tmp, "odd.raw"), odd);
  });

  const cases: string[][] = [
    ["bs=4k", "count=100", "skip=3"],
    ["bs=1000", "skip=7"],
    ["bs=512"],
    ["bs=64k", "count=20"],
    ["bs=1.5k", "count=333", "skip=1"],
    ["bs=4k", "skip=1000"],
  ];
  for (const out of ["qcow2", "qed", "raw"]) {
    it(`-O ${out}`, async () => {
      for (const src of SOURCES) {
        for (const extra of cases) {
          const what = `${src} -O ${out} ${extra.join(" ")}`;
          const fmt = src.endsWith(".raw") ? "raw" : src.endsWith(".qed") ? "qed" : "qcow2";
          for (const f of ["theirs", "ours"]) rmSync(join(tmp, f), { force: true });
          const args = ["dd", "-f", fmt, "-O", out, `if=${src}`];
          const theirs = qemuImg([...args, "of=theirs", ...extra], tmp);
          const ours = await qimg([...args, "of=ours", ...extra], tmp);
          expect(ours.code, what).toBe(theirs.code);
          expect(ours.stderr, what).toBe(theirs.stderr.replaceAll("qemu-img: ", "qimg: "));
          const facts = (file: string) => {
            const i = qemuInfo(join(tmp, file), out);
            return [i["virtual-size"], i.format, i["cluster-size"]];
          };
          expect(facts("ours"), what).toEqual(facts("theirs"));
          const cmp = qemuImg(["compare", "-f", out, "-F", out, "theirs", "ours"], tmp);
          expect(cmp.stdout, what).toBe("Images are identical.\n");
          if (out !== "raw") expect(qemuImg(["check", "-f", out, "ours"], tmp).code, what).toBe(0);
        }
      }
    });
  }

  it("a dd that fails leaves no output; an unknown -O is refused as qemu-img refuses it", async () => {
    ok(qemuImg(["create", "-q", "-f", "qcow2", "bad.qcow2", "1M"], tmp));
    ok(qemuIo(["-c", "write -c -P 5 0 64k", "bad.qcow2"], tmp));
    // Break the compressed cluster's deflate stream (its host offset from the L2 entry).
    const { openSync, readSync, writeSync, closeSync } = await import("node:fs");
    const fd = openSync(join(tmp, "bad.qcow2"), "r+");
    const b = Buffer.alloc(8);
    readSync(fd, b, 0, 8, 40);
    readSync(fd, b, 0, 8, Number(b.readBigUInt64BE(0)));
    const l2 = Number(b.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    readSync(fd, b, 0, 8, l2);
    const host = Number(b.readBigUInt64BE(0) & ((1n << 54n) - 1n));
    writeSync(fd, Buffer.alloc(64, 0xff), 0, 64, host);
    closeSync(fd);
    for (const out of ["qcow2", "qed", "raw"]) {
      const theirs = qemuImg(["dd", "-O", out, "if=bad.qcow2", `of=bad-theirs.${out}`], tmp);
      const ours = await qimg(["dd", "-O", out, "if=bad.qcow2", `of=bad-ours.${out}`], tmp);
      expect(theirs.code, out).toBe(1);
      expect(ours.code, out).toBe(1);
      expect(existsSync(join(tmp, `bad-ours.${out}`)), out).toBe(false);
    }
    const theirs = qemuImg(["dd", "-O", "vmdkx", "if=src.qcow2", "of=x-theirs"], tmp);
    const ours = await qimg(["dd", "-O", "vmdkx", "if=src.qcow2", "of=x-ours"], tmp);
    expect([ours.code, ours.stderr]).toEqual([
      theirs.code,
      theirs.stderr.replace("qemu-img", "qimg"),
    ]);
    expect(existsSync(join(tmp, "x-ours"))).toBe(false);
  });
});
