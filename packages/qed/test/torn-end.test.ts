/**
 * QED files whose size is not a multiple of the cluster size (a torn last cluster), against
 * the real qemu-img / qemu-io on twin files. Skips with a printed reason when qemu-img is
 * missing (fails instead when QIMG_REQUIRE_QEMU=1).
 *
 * - QEMU's file size is the length rounded up to a 512-byte sector, then down to a cluster:
 *   a file up to 511 bytes short of its last cluster is whole, and a write allocates after it.
 * - When the file ends further inside a cluster that a table points into, the bytes still
 *   there are in use: a write allocates past that cluster (qemu-io allocates on top of it and
 *   corrupts the image), and `repair` grows the file to the cluster's end instead of dropping
 *   the entry (QEMU drops it).
 */
import { copyFileSync, readFileSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { checkQed, openQed } from "@qimg/qed";
import { prng } from "../src/testing/util.js";
import { SEED, haveQemu, noteSkipWithoutQemu, qemuCounts, run, workDir } from "./helpers.js";

noteSkipWithoutQemu("QED torn-end tests");
const work = workDir("qimg-qed-torn-");

/** qemu-io `read -P` of a range: true when every byte is `byte`. */
function qemuReads(file: string, offset: number, length: number, byte: number): boolean {
  const r = run("qemu-io", ["-f", "qed", "-c", `read -P ${byte} ${offset} ${length}`, file]);
  return r.status === 0 && !/verification failed|failed/i.test(r.stdout + r.stderr);
}

/**
 * A QEMU-made image whose last cluster is a data cluster of guest offset 1 MiB (pattern 0x22
 * in its first `dataLen` bytes), then the file cut by `cut` bytes.
 */
function tornImage(name: string, clusterSize: number, dataLen: number, cut: number): string {
  const file = join(work, name);
  expect(
    run("qemu-img", ["create", "-f", "qed", "-o", `cluster_size=${clusterSize}`, file, "10M"])
      .status,
  ).toBe(0);
  const w = run("qemu-io", [
    "-f",
    "qed",
    "-c",
    "write -P 0x11 0 100k",
    "-c",
    `write -P 0x22 1M ${dataLen}`,
    file,
  ]);
  expect(w.status, w.stderr).toBe(0);
  truncateSync(file, statSync(file).size - cut);
  return file;
}

async function qimgWrite(file: string, offset: number, data: Uint8Array): Promise<void> {
  const img = await openQed(await FileBackend.open(file), { readOnly: false });
  try {
    await img.write(offset, data);
  } finally {
    await img.close();
  }
}

describe.skipIf(!haveQemu)(`QED file with a torn last cluster (seed ${SEED})`, () => {
  it("a file up to 511 bytes short of its last cluster is whole: a write allocates after it, as qemu-io's does", async () => {
    const rnd = prng(SEED);
    for (const cs of [4096, 65536]) {
      const cut = 1 + Math.floor(rnd() * 511);
      const dataLen = 512 * (1 + Math.floor(rnd() * 7));
      const ours = tornImage(`short-${cs}.qed`, cs, dataLen, cut);
      const theirs = join(work, `short-${cs}-qemu.qed`);
      copyFileSync(ours, theirs);
      const before = qemuCounts(ours);
      expect(before.corruptions, `seed ${SEED} cs ${cs} cut ${cut}`).toBe(0);
      const at = 5 * 1024 * 1024 + Math.floor(rnd() * 1000) * 512;
      await qimgWrite(ours, at, new Uint8Array(4096).fill(0x33));
      expect(run("qemu-io", ["-f", "qed", "-c", `write -P 0x33 ${at} 4k`, theirs]).status).toBe(0);
      // Before the fix qimg rounded the size down and allocated on top of the data cluster.
      expect(qemuCounts(ours), `seed ${SEED} cs ${cs} cut ${cut}`).toEqual(before);
      const cmp = run("qemu-img", ["compare", "-f", "qed", "-F", "qed", ours, theirs]);
      expect(cmp.status, `seed ${SEED} cs ${cs} cut ${cut}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
      expect(qemuReads(ours, 1024 * 1024, dataLen, 0x22)).toBe(true);
    }
  });

  it("a write allocates past a torn cluster that a table points into (qemu-io writes on top of it)", async () => {
    const rnd = prng(SEED + 1);
    for (const cs of [4096, 65536]) {
      const dataLen = 512 * (1 + Math.floor(rnd() * 7));
      // Cut more than a sector, but leave the 0x22 bytes in place.
      const cut = 512 + Math.floor(rnd() * (cs - dataLen - 512));
      const ours = tornImage(`torn-${cs}.qed`, cs, dataLen, cut);
      const before = qemuCounts(ours);
      await qimgWrite(ours, 5 * 1024 * 1024 + 512, new Uint8Array(4096).fill(0x33));
      const after = qemuCounts(ours);
      const where = `seed ${SEED} cs ${cs} cut ${cut}`;
      expect(after.corruptions + after.leaks + after.errors, where).toBeLessThanOrEqual(
        before.corruptions + before.leaks + before.errors,
      );
      expect(after.corruptions, where).toBe(0);
      expect(qemuReads(ours, 1024 * 1024, dataLen, 0x22), where).toBe(true);
      expect(qemuReads(ours, 5 * 1024 * 1024 + 512, 4096, 0x33), where).toBe(true);
      expect(qemuReads(ours, 0, 100 * 1024, 0x11), where).toBe(true);
    }
  });

  it("repair keeps the bytes of a torn cluster that a table points into", async () => {
    const rnd = prng(SEED + 2);
    for (const cs of [4096, 65536]) {
      const dataLen = 512 * (1 + Math.floor(rnd() * 7));
      const cut = 512 + Math.floor(rnd() * (cs - dataLen - 512));
      const ours = tornImage(`repair-${cs}.qed`, cs, dataLen, cut);
      const where = `seed ${SEED} cs ${cs} cut ${cut}`;
      expect(qemuCounts(ours).corruptions, where).toBe(1);
      const backend = await FileBackend.open(ours);
      try {
        const r = await checkQed(backend, { repair: true });
        expect(r.corruptions, where).toBe(0);
        expect(r.corruptionsFixed, where).toBe(1);
      } finally {
        await backend.close();
      }
      expect(qemuCounts(ours), where).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
      expect(qemuReads(ours, 1024 * 1024, dataLen, 0x22), where).toBe(true);
      expect(qemuReads(ours, 0, 100 * 1024, 0x11), where).toBe(true);
    }
  });

  it("repair leaves a torn cluster alone when several entries point into it (growing would make them all valid)", async () => {
    const rnd = prng(SEED + 3);
    for (const cs of [4096, 65536]) {
      const dataLen = 512 * (1 + Math.floor(rnd() * 7));
      const cut = 512 + Math.floor(rnd() * (cs - dataLen - 512));
      const ours = tornImage(`twice-${cs}.qed`, cs, dataLen, cut);
      // A second L2 entry (guest offset 1 MiB + one cluster) names the same torn cluster.
      const f = new Uint8Array(readFileSync(ours));
      const dv = new DataView(f.buffer);
      const l1 = Number(dv.getBigUint64(40, true));
      const entries = (dv.getUint32(8, true) * cs) / 8;
      const g = 1024 * 1024;
      const l2 = Number(dv.getBigUint64(l1 + Math.floor(g / cs / entries) * 8, true));
      const at = l2 + ((g / cs) % entries) * 8;
      dv.setBigUint64(at + 8, dv.getBigUint64(at, true), true);
      writeFileSync(ours, f);
      const where = `seed ${SEED} cs ${cs} cut ${cut}`;
      const before = qemuCounts(ours);
      const size = statSync(ours).size;
      const backend = await FileBackend.open(ours);
      try {
        await checkQed(backend, { repair: true });
      } finally {
        await backend.close();
      }
      expect(statSync(ours).size, where).toBe(size);
      const after = qemuCounts(ours);
      expect(after.corruptions + after.leaks + after.errors, where).toBeLessThanOrEqual(
        before.corruptions + before.leaks + before.errors,
      );
    }
  });

  it("repair leaves a torn cluster alone when an L2 table reaches into it", async () => {
    for (const cs of [4096, 65536]) {
      const ours = join(work, `table-${cs}.qed`);
      expect(
        run("qemu-img", [
          "create",
          "-f",
          "qed",
          "-o",
          `cluster_size=${cs},table_size=4`,
          ours,
          "64M",
        ]).status,
      ).toBe(0);
      expect(run("qemu-io", ["-f", "qed", "-c", "write -P 0x11 0 100k", ours]).status).toBe(0);
      const end = statSync(ours).size;
      // L1 entry 2 names a "table" of 4 clusters whose last one is the torn cluster at `end`.
      const f = new Uint8Array(readFileSync(ours));
      const dv = new DataView(f.buffer);
      const l1 = Number(dv.getBigUint64(40, true));
      dv.setBigUint64(l1 + 16, BigInt(end - 3 * cs), true);
      writeFileSync(ours, f);
      truncateSync(ours, end + 1000);
      const before = qemuCounts(ours);
      const backend = await FileBackend.open(ours);
      try {
        await checkQed(backend, { repair: true });
      } finally {
        await backend.close();
      }
      expect(statSync(ours).size, `cs ${cs}`).toBe(end + 1000);
      const after = qemuCounts(ours);
      expect(after.corruptions + after.leaks + after.errors, `cs ${cs}`).toBeLessThanOrEqual(
        before.corruptions + before.leaks + before.errors,
      );
      expect(qemuReads(ours, 0, 100 * 1024, 0x11)).toBe(true);
    }
  });

  it("a torn cluster that nothing points into is reused by the next allocation, as qemu-io does", async () => {
    for (const cs of [4096, 65536]) {
      const ours = join(work, `junk-${cs}.qed`);
      expect(
        run("qemu-img", ["create", "-f", "qed", "-o", `cluster_size=${cs}`, ours, "10M"]).status,
      ).toBe(0);
      expect(run("qemu-io", ["-f", "qed", "-c", "write -P 0x11 0 100k", ours]).status).toBe(0);
      truncateSync(ours, statSync(ours).size + 1000);
      const theirs = join(work, `junk-${cs}-qemu.qed`);
      copyFileSync(ours, theirs);
      await qimgWrite(ours, 3 * 1024 * 1024, new Uint8Array(4096).fill(0x44));
      expect(run("qemu-io", ["-f", "qed", "-c", `write -P 0x44 3M 4k`, theirs]).status).toBe(0);
      expect(statSync(ours).size).toBe(statSync(theirs).size);
      expect(qemuCounts(ours)).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
      expect(run("qemu-img", ["compare", ours, theirs]).status).toBe(0);
    }
  });
});
