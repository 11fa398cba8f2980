/**
 * `qimg io` exit status against qemu-io (differential finding F9): a failed aio request, or an
 * aio_read whose pattern does not match, is reported when it completes but leaves the exit
 * status alone; synchronous commands' failures (including aio argument errors) make it 1.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping qimg io aio exit-status tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-io-aio-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const SCRIPTS: readonly (readonly string[])[] = [
  ["aio_write -P 3 2000000 1000", "aio_flush"],
  ["aio_write -P 3 2000000 1000"],
  ["aio_write -P 3 2000000 1000", "read -P 0 0 512"],
  ["aio_write -P 3 0 1000", "aio_flush", "aio_read -P 4 0 1000", "aio_flush"],
  ["aio_read -P 3 1048000 1000", "aio_flush"],
  ["aio_write -P 3 2000000", "aio_flush"],
  ["aio_write -P 3 2000000 1000", "aio_flush", "read -P 1 0 512"],
  ["aio_write -P 3 2000000 1000", "write 2000000 1"],
  ["write -P 5 1000 3000", "aio_read -P 5 1000 3000", "aio_flush"],
];

describe.skipIf(!hasQemu)("qimg io exit status after aio requests (F9)", () => {
  SCRIPTS.forEach((script, n) => {
    it(`${script.join(" ; ")}`, async () => {
      const a = join(tmp, `q${n}.qcow2`);
      const b = join(tmp, `o${n}.qcow2`);
      for (const f of [a, b])
        expect(qemuImg(["create", "-q", "-f", "qcow2", f, "1M"]).code).toBe(0);
      const args = script.flatMap((c) => ["-c", c]);
      const q = qemuIo([...args, a]);
      const o = await qimg(["io", ...args, b]);
      expect(o.code, `qemu-io: ${q.stdout}${q.stderr}\nqimg: ${o.stdout}${o.stderr}`).toBe(q.code);
      // The same failure lines (reports with timings aside; aio completions may come in
      // either order).
      const fails = (s: string): string[] =>
        s
          .split("\n")
          .filter((l) => /failed/.test(l))
          .sort();
      expect(fails(o.stdout)).toEqual(fails(q.stdout));
    });
  });
});
