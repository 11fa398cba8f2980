/**
 * QED 4 KiB reads and writes at queue depth 64: @qimg/qed vs `qemu-img bench -f qed`, same
 * image size, request count, depth and offsets (qemu-img bench walks the image sequentially
 * with a step; we issue the same offsets), in one run. Prints seconds and the ratio
 * qimg/qemu-img (lower is better). Asserts nothing. Skips with a reason without qemu-img.
 */
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { FileBackend } from "@qimg/io/node";
import { openQed } from "../src/index.js";

const SIZE = 1 << 30;
const COUNT = Number(process.env.QIMG_BENCH_COUNT ?? 200_000);
const DEPTH = 64;
const REQ = 4096;

if (spawnSync("qemu-img", ["--version"]).status !== 0) {
  console.log("qed bench skipped: qemu-img is not on PATH");
  process.exit(0);
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-qed-bench-"));
try {
  const file = path.join(dir, "bench.qed");
  // A fully allocated image, so reads hit data and writes are in place (as in qemu-img bench).
  execFileSync("qemu-img", ["create", "-q", "-f", "qed", file, String(SIZE)]);
  execFileSync("qemu-io", ["-f", "qed", "-c", `write -P 0x5a 0 ${SIZE}`, file], {
    stdio: "ignore",
  });

  const qemu = (write: boolean): number => {
    const args = [
      "bench",
      "-f",
      "qed",
      "-c",
      String(COUNT),
      "-d",
      String(DEPTH),
      "-s",
      String(REQ),
      "-t",
      "writeback",
    ];
    if (write) args.push("-w");
    const t = performance.now();
    execFileSync("qemu-img", [...args, file], { stdio: "ignore" });
    return (performance.now() - t) / 1000;
  };

  const ours = async (write: boolean): Promise<number> => {
    const t = performance.now();
    const image = await openQed(await FileBackend.open(file, { readOnly: !write }), {
      readOnly: !write,
    });
    const buf = new Uint8Array(REQ).fill(0xa5);
    let next = 0;
    const worker = async (): Promise<void> => {
      const mine = new Uint8Array(REQ);
      while (next < COUNT) {
        const off = (next++ * REQ) % SIZE;
        if (write) await image.write(off, buf);
        else await image.read(off, mine);
      }
    };
    await Promise.all(Array.from({ length: DEPTH }, worker));
    if (write) await image.flush();
    await image.close();
    return (performance.now() - t) / 1000;
  };

  console.log(
    `QED bench: ${COUNT} requests of ${REQ} bytes, depth ${DEPTH}, 1 GiB image (seconds; ratio = qimg / qemu-img)`,
  );
  for (const write of [false, true]) {
    const q = qemu(write);
    const o = await ours(write);
    console.log(
      `${(write ? "4k writes" : "4k reads").padEnd(10)} qemu-img ${q.toFixed(3)}  qimg ${o.toFixed(3)}  ratio ${(o / q).toFixed(2)}`,
    );
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
