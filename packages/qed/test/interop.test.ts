/**
 * Interop with the real qemu-img / qemu-io, both directions. Skips with a printed reason when
 * qemu-img is missing (fails instead when QIMG_REQUIRE_QEMU=1).
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { RawImage } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import type { BackingOpener, QedImage } from "@qimg/qed";
import { checkQed, createQed, openQed } from "@qimg/qed";
import { copyFixture, fixturePath, listFixtures, normalizeMap, requireQemu } from "@qimg/fixtures";
import type { MapEntry } from "@qimg/fixtures";

const haveQemu = requireQemu();
if (!haveQemu)
  console.log(
    "skipping QED interop tests: qemu-img is not on PATH (set QIMG_REQUIRE_QEMU=1 to fail instead)",
  );

const K = 1024;
const M = 1024 * 1024;
const work = mkdtempSync(join(tmpdir(), "qimg-qed-interop-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

function run(cmd: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Opens raw backing files by path, relative to the image that names them. */
const openRaw: BackingOpener = async (req) =>
  await RawImage.open(
    await FileBackend.open(resolve(dirname(req.relativeTo), req.filename), { readOnly: true }),
  );

async function readWhole(img: QedImage): Promise<Uint8Array> {
  const out = new Uint8Array(img.virtualSize);
  await img.read(0, out);
  return out;
}

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

async function mapOf(img: QedImage): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  for (let pos = 0; pos < img.virtualSize;) {
    const s = await img.blockStatus(pos, img.virtualSize - pos);
    out.push({
      start: s.offset,
      length: s.length,
      depth: s.depth,
      present: s.present,
      zero: s.zero,
      data: s.data,
      ...(s.hostOffset === undefined ? {} : { offset: s.hostOffset }),
    });
    pos += s.length;
  }
  return normalizeMap(out);
}

function qemuRaw(path: string, fmt = "qed"): Uint8Array {
  const out = join(work, `convert-${Math.random().toString(36).slice(2)}.raw`);
  const r = run("qemu-img", ["convert", "-f", fmt, "-O", "raw", path, out]);
  expect(r.status, r.stderr).toBe(0);
  const b = new Uint8Array(readFileSync(out));
  rmSync(out);
  return b;
}

describe.skipIf(!haveQemu)("QED fixtures made by qemu", () => {
  const fixtures = listFixtures({ format: "qed" });
  it("has QED fixtures", () => {
    expect(fixtures.length).toBeGreaterThan(0);
  });
  for (const f of fixtures) {
    it(`${f.name}: reads with the manifest's sha256 and info`, async () => {
      const img = await openQed(await FileBackend.open(fixturePath(f.name), { readOnly: true }), {
        openBacking: openRaw,
      });
      expect(img.virtualSize).toBe(f.virtualSize);
      expect(img.info().clusterSize).toBe(f.info?.["cluster-size"]);
      expect(img.info().backingFilename).toBe(f.info?.["backing-filename"]);
      expect(img.info().backingFormat).toBe(f.info?.["backing-filename-format"]);
      expect(sha256(await readWhole(img))).toBe(f.sha256);
      await img.close();
    });
    if (f.map !== null && f.options.backing_file === undefined) {
      it(`${f.name}: block status matches qemu-img map`, async () => {
        const img = await openQed(await FileBackend.open(fixturePath(f.name), { readOnly: true }));
        expect(await mapOf(img)).toEqual(
          normalizeMap(f.map ?? []).map(({ filename: _f, ...e }) => e),
        );
        await img.close();
      });
    }
  }

  it("qed-backing: depths and host offsets match qemu-img map", async () => {
    const img = await openQed(
      await FileBackend.open(fixturePath("qed-backing"), { readOnly: true }),
      { openBacking: openRaw },
    );
    // Holes in the raw backing file depend on the host file system: compare layers and offsets only.
    const flatten = (m: readonly MapEntry[]) =>
      normalizeMap(m.map((e) => (e.depth === 1 ? { ...e, zero: false, data: true } : e))).map(
        (e) => [e.start, e.length, e.depth, e.offset],
      );
    expect(flatten(await mapOf(img))).toEqual(flatten(getMap("qed-backing")));
    await img.close();
  });

  it("qed-dirty: a read-write open repairs and clears need-check; qemu-img check agrees", async () => {
    const path = copyFixture("qed-dirty", join(work, "dirty"));
    const before = readFileSync(path);
    expect(before.readUInt32LE(16) & 2).toBe(2);
    const img = await openQed(await FileBackend.open(path), { readOnly: false });
    expect(img.needCheck).toBe(false);
    const r = await checkQed(img);
    expect(r).toMatchObject({
      corruptions: 0,
      leaks: 0,
      allocatedClusters: 2,
      fragmentedClusters: 1,
      totalClusters: 32,
    });
    await img.close();
    expect(readFileSync(path).readUInt32LE(16) & 2).toBe(0);
    const c = run("qemu-img", ["check", "-f", "qed", path]);
    expect(c.status, c.stderr).toBe(0);
    expect(sha256(qemuRaw(path))).toBe(
      listFixtures({ format: "qed" }).find((x) => x.name === "qed-dirty")?.sha256,
    );
  });
});

function getMap(name: string): MapEntry[] {
  return [...(listFixtures().find((f) => f.name === name)?.map ?? [])];
}

/** Apply seeded random writes to a model and an image. */
async function randomWrites(
  img: QedImage,
  model: Uint8Array,
  seed: number,
  steps: number,
): Promise<void> {
  let a = seed >>> 0;
  const rand = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  for (let i = 0; i < steps; i++) {
    const off = Math.floor(rand() * model.length);
    const len = Math.min(model.length - off, 1 + Math.floor(rand() * 200 * K));
    if (rand() < 0.75) {
      const d = new Uint8Array(len).fill(1 + Math.floor(rand() * 255));
      model.set(d, off);
      await img.write(off, d);
    } else {
      model.fill(0, off, off + len);
      await img.writeZeroes(off, len);
    }
  }
}

describe.skipIf(!haveQemu)("images made by qimg, read by qemu", () => {
  for (const [clusterSize, tableSize] of [
    [65536, 4],
    [4096, 2],
    [1 << 20, 16],
  ] as const) {
    it(`cluster ${clusterSize}, table ${tableSize}: qemu-img check is clean and the data matches`, async () => {
      const path = join(work, `made-${clusterSize}-${tableSize}.qed`);
      const size = 8 * M + 512;
      const made = await FileBackend.open(path, { create: true, truncate: true });
      await createQed(made, { size, clusterSize, tableSize });
      await made.close(); // an image open for writing cannot be opened again
      const info = JSON.parse(run("qemu-img", ["info", "--output=json", path]).stdout) as Record<
        string,
        unknown
      >;
      expect(info).toMatchObject({
        format: "qed",
        "virtual-size": size,
        "cluster-size": clusterSize,
      });
      const img = await openQed(await FileBackend.open(path), { readOnly: false });
      const model = new Uint8Array(size);
      await randomWrites(img, model, clusterSize + tableSize, 40);
      await img.close();
      const c = run("qemu-img", ["check", "-f", "qed", "--output=json", path]);
      expect(c.status, c.stdout + c.stderr).toBe(0);
      const got = qemuRaw(path);
      expect(got.length).toBe(size);
      expect(sha256(got)).toBe(sha256(model));
      // Spot-check with qemu-io's pattern verification.
      const img2 = await openQed(await FileBackend.open(path), { readOnly: false });
      await img2.write(M, new Uint8Array(3000).fill(0x5a));
      await img2.close();
      const q = run("qemu-io", ["-f", "qed", "-c", `read -P 0x5a ${M} 3000`, path]);
      expect(q.stdout + q.stderr).not.toMatch(/verification failed/i);
      expect(q.status).toBe(0);
    });
  }

  it("over a raw backing file: qemu reads what qimg wrote", async () => {
    const dir = mkdtempSync(join(work, "bk-"));
    const base = new Uint8Array(3 * M).map((_, i) => (i >> 10) & 0xff);
    writeFileSync(join(dir, "base.raw"), base);
    const path = join(dir, "top.qed");
    const made = await FileBackend.open(path, { create: true });
    await createQed(made, { size: 4 * M, backingFile: "base.raw", backingFormat: "raw" });
    await made.close(); // an image open for writing cannot be opened again
    const img = await openQed(await FileBackend.open(path), {
      readOnly: false,
      openBacking: openRaw,
    });
    const model = new Uint8Array(4 * M);
    model.set(base);
    await randomWrites(img, model, 7, 30);
    await img.close();
    const info = JSON.parse(run("qemu-img", ["info", "--output=json", path]).stdout) as Record<
      string,
      unknown
    >;
    expect(info).toMatchObject({
      "backing-filename": "base.raw",
      "backing-filename-format": "raw",
    });
    expect(run("qemu-img", ["check", "-f", "qed", path]).status).toBe(0);
    expect(sha256(qemuRaw(path))).toBe(sha256(model));
  });
});

describe.skipIf(!haveQemu)("images written by qemu-io, read by qimg", () => {
  it("reads qemu-io's writes, zero writes and a backing chain identically", async () => {
    const dir = mkdtempSync(join(work, "qio-"));
    const base = join(dir, "base.raw");
    const top = join(dir, "top.qed");
    expect(run("qemu-img", ["create", "-q", "-f", "raw", base, "3M"]).status).toBe(0);
    expect(run("qemu-io", ["-f", "raw", "-c", "write -P 0xaa 0 3M", base]).status).toBe(0);
    expect(
      run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096,table_size=2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top,
        "5M",
      ]).status,
    ).toBe(0);
    const cmds = [
      "write -P 0x11 0 100k",
      "write -z 512k 64k",
      "write -P 0x22 1000 3000",
      "write -P 0x33 2M 2M",
      "write -z 4M 8k",
    ];
    const r = run("qemu-io", ["-f", "qed", ...cmds.flatMap((c) => ["-c", c]), top]);
    expect(r.status, r.stderr).toBe(0);
    const img = await openQed(await FileBackend.open(top, { readOnly: true }), {
      openBacking: openRaw,
    });
    expect(sha256(await readWhole(img))).toBe(sha256(qemuRaw(top)));
    // Zero clusters written by qemu-io show up as zero, present, at depth 0.
    expect(await img.blockStatus(512 * K, 64 * K)).toMatchObject({
      present: true,
      zero: true,
      data: false,
      depth: 0,
      length: 64 * K,
    });
    await img.close();
  });
});
