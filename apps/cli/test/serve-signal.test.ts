/**
 * `qimg serve` stopped by SIGTERM/SIGINT while writes are in flight: it stops reading
 * requests, finishes and answers the writes it started, flushes and closes the image, and
 * exits 0. `qemu-img check` is clean, a lazy-refcounts image is not left dirty, and every
 * write the client saw acknowledged is in the image.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { NbdCmd } from "@qimg/nbd";
import { seededRandom } from "@qimg/io";
import { describe, expect, it } from "vitest";
import { NbdTestClient } from "./nbd-client.js";
import { requireNbd, serveScratch, tool } from "./serve-helpers.js";

const hasNbd = requireNbd();
const scratch = serveScratch("qimg-serve-sig-");

/** Bit 0 of the qcow2 header's incompatible features (offset 72, big-endian u64). */
function dirtyBit(file: string): boolean {
  const h = readFileSync(file).subarray(72, 80);
  return (h[7]! & 1) === 1;
}

describe.skipIf(!hasNbd)("qimg serve on SIGTERM/SIGINT", () => {
  it.each(["SIGTERM", "SIGINT"] as const)(
    "%s with writes in flight leaves a clean image holding every acknowledged write",
    async (signal) => {
      const size = 24 * 1024 * 1024 + 512;
      const file = join(scratch.dir, `${signal}.qcow2`);
      expect(
        tool("qemu-img", [
          "create",
          "-f",
          "qcow2",
          "-o",
          "lazy_refcounts=on,cluster_size=65536",
          file,
          String(size),
        ]).code,
      ).toBe(0);
      const socket = join(scratch.dir, `${signal}.sock`);
      const server = await scratch.serveOn(["-f", "qcow2", file], socket);
      const client = await NbdTestClient.connect({ socket });
      const rnd = seededRandom(signal === "SIGTERM" ? 7 : 8);
      const writes = Array.from({ length: 300 }, (_, i) => {
        // Under 80 KiB: no two writes overlap.
        const data = new Uint8Array(65536 + 512 * Math.floor(rnd() * 32)).fill(1 + (i % 250));
        return { off: i * 80 * 1024, data };
      });
      const pending = writes.map((w) =>
        client.request(NbdCmd.WRITE, w.off, w.data.length, 0, w.data),
      );
      // Signal once the first replies are back: the rest are in flight or not yet read.
      await pending[3];
      server.proc.kill(signal);
      const replies = await Promise.all(pending);
      expect(await server.exited).toBe(0);
      const acked = replies.filter((r) => r.error === 0).length;
      expect(acked).toBeGreaterThanOrEqual(4);
      const check = tool("qemu-img", ["check", "-f", "qcow2", file]);
      expect(check.stdout + check.stderr).toContain("No errors were found on the image.");
      expect(check.code).toBe(0);
      expect(dirtyBit(file)).toBe(false);
      const out = join(scratch.dir, `${signal}.raw`);
      expect(tool("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", file, out]).code).toBe(0);
      const bytes = readFileSync(out);
      replies.forEach((r, i) => {
        if (r.error !== 0) return;
        const w = writes[i]!;
        expect(
          Buffer.compare(bytes.subarray(w.off, w.off + w.data.length), Buffer.from(w.data)),
          `write ${i}`,
        ).toBe(0);
      });
    },
  );
});
