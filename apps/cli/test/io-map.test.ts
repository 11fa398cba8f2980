/**
 * `qimg io -c map` prints what `qemu-io -c map` prints: runs allocated in the top image (data
 * or zero clusters) and runs that are not, merged, for qcow2 and QED images over a backing
 * file, after a seeded mix of writes and zero writes at offsets that are no multiple of the
 * cluster size.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping io map tests: qemu-img/qemu-io are not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-io-map-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.skipIf(!hasQemu)("qimg io -c map", () => {
  it.each(["qcow2", "qed"])(
    "%s: the same runs as qemu-io's map",
    async (format) => {
      const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
      const rnd = prng(seed);
      for (let round = 0; round < 4; round++) {
        const size = 3 * 1024 * 1024 + 512 * Math.floor(rnd() * 3000);
        const base = join(tmp, `base-${format}-${round}.raw`);
        const top = join(tmp, `top-${round}.${format}`);
        expect(qemuImg(["create", "-q", "-f", "raw", base, String(size)]).code).toBe(0);
        const cs =
          format === "qed" ? 4096 * 2 ** Math.floor(rnd() * 5) : 512 * 2 ** Math.floor(rnd() * 8);
        const create = ["create", "-q", "-f", format, "-o", `cluster_size=${cs}`];
        expect(qemuImg([...create, "-b", base, "-F", "raw", top, String(size)]).code).toBe(0);
        const cmds: string[] = [];
        for (let i = 0; i < 12; i++) {
          const off = 512 * Math.floor((rnd() * (size - 4096)) / 512);
          const len = 512 * Math.min(Math.floor((size - off) / 512), 1 + Math.floor(rnd() * 300));
          cmds.push(rnd() < 0.7 ? `write -P ${i + 1} ${off} ${len}` : `write -z ${off} ${len}`);
        }
        const setup = qemuIo(["-f", format, ...cmds.flatMap((c) => ["-c", c]), top]);
        expect(setup.code, setup.stdout + setup.stderr).toBe(0);
        const theirs = qemuIo(["-f", format, "-r", "-c", "map", top]);
        const ours = await qimg(["io", "-f", format, "-r", "-c", "map", top]);
        expect(ours.code, ours.stderr).toBe(theirs.code);
        expect(ours.stdout, `seed ${seed} round ${round}: ${cmds.join("; ")}`).toBe(theirs.stdout);
      }
    },
    60_000,
  );
});
