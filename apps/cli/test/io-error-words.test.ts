/**
 * `qimg io` words a failed request as qemu-io does, chosen by the error's code (not by its
 * message): a request past the end of the disk is EIO before it reaches the image, a
 * compressed write to a format without compressed clusters is ENOTSUP, a request that meets
 * corrupt metadata is EIO. Each script runs through qemu-io and qimg io on twin images; the
 * "... failed: ..." lines and the exit codes must be the same.
 */
import {
  copyFileSync,
  mkdtempSync,
  openSync,
  readSync,
  rmSync,
  writeSync,
  closeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping io error-word tests: qemu-img/qemu-io are not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-io-words-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/**
 * The "failed" lines of a qemu-io style run, sorted: qemu-io reports failed aio requests in
 * an order of its own (an aio_write refused past the end before an aio_read issued earlier),
 * which qimg does not reproduce; the words and the count are what is compared here.
 */
function failures(stdout: string): string[] {
  return stdout
    .split("\n")
    .filter((l) => l.includes(" failed: "))
    .sort();
}

/** Run `cmds` on a copy of `file` each through qemu-io and qimg io; compare. */
async function same(file: string, format: string, cmds: string[], readOnly = false) {
  const theirsFile = `${file}.q`;
  const oursFile = `${file}.o`;
  copyFileSync(join(tmp, file), join(tmp, theirsFile));
  copyFileSync(join(tmp, file), join(tmp, oursFile));
  const args = (f: string) => [
    "-f",
    format,
    ...(readOnly ? ["-r"] : []),
    ...cmds.flatMap((c) => ["-c", c]),
    f,
  ];
  const theirs = qemuIo(args(theirsFile), tmp);
  const ours = await qimg(["io", ...args(oursFile)], tmp);
  const what = `${format} ${cmds.join("; ")}`;
  expect(failures(ours.stdout), `${what}\nqimg: ${ours.stdout}${ours.stderr}`).toEqual(
    failures(theirs.stdout),
  );
  expect(failures(theirs.stdout).length, what).toBeGreaterThan(0);
  expect(ours.code, what).toBe(theirs.code);
}

describe.skipIf(!hasQemu)("qimg io: failed requests in qemu-io's words", () => {
  it("past the end of the disk (sync and aio, every request kind, every format): Input/output error", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
    const rnd = prng(seed);
    // Sizes that are no multiple of the cluster size (raw: nor of a sector).
    const size = 1000 * 1024 + 512 * Math.floor(1 + rnd() * 50);
    const rawSize = size + 1 + Math.floor(rnd() * 500);
    expect(qemuImg(["create", "-q", "-f", "qcow2", "a.qcow2", String(size)], tmp).code).toBe(0);
    expect(qemuImg(["create", "-q", "-f", "qed", "a.qed", String(size)], tmp).code).toBe(0);
    expect(qemuImg(["create", "-q", "-f", "raw", "a.raw", String(rawSize)], tmp).code).toBe(0);
    for (const [file, format] of [
      ["a.qcow2", "qcow2"],
      ["a.qed", "qed"],
      ["a.raw", "raw"],
    ] as const) {
      const v = format === "raw" ? Math.ceil(rawSize / 512) * 512 : size;
      const off = v - 512 * Math.floor(1 + rnd() * 4);
      const len = 512 * Math.floor(5 + rnd() * 8);
      await same(file, format, [
        `read ${off} ${len}`,
        `write ${off} ${len}`,
        `write -z ${off} ${len}`,
        `discard ${off} ${len}`,
        `aio_read ${off} ${len}`,
        `aio_write ${off} ${len}`,
        "aio_flush",
        `read ${v} 512`,
      ]);
    }
  }, 60_000);

  it("compressed writes to QED and raw: Operation not supported", async () => {
    expect(qemuImg(["create", "-q", "-f", "qed", "c.qed", "1000000"], tmp).code).toBe(0);
    expect(qemuImg(["create", "-q", "-f", "raw", "c.raw", "100000"], tmp).code).toBe(0);
    await same("c.qed", "qed", ["write -c 0 64k", "write -c 65536 512"]);
    await same("c.raw", "raw", ["write -c 0 512"]);
  });

  it("a read through a misaligned L2 table offset (corrupt image): Input/output error", async () => {
    expect(qemuImg(["create", "-q", "-f", "qcow2", "bad.qcow2", "1000000"], tmp).code).toBe(0);
    expect(qemuIo(["-f", "qcow2", "-c", "write -P 7 0 70000", "bad.qcow2"], tmp).code).toBe(0);
    // Point L1 entry 0 at an unaligned L2 table offset (QEMU: "L2 table offset ... unaligned").
    const fd = openSync(join(tmp, "bad.qcow2"), "r+");
    const head = Buffer.alloc(48);
    readSync(fd, head, 0, 48, 0);
    const l1 = Number(head.readBigUInt64BE(40));
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE((1n << 63n) | 0x40200n);
    writeSync(fd, entry, 0, 8, l1);
    closeSync(fd);
    await same("bad.qcow2", "qcow2", ["read 0 4k", "read -P 7 4096 512"], true);
  });
});
