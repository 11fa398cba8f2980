import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { requireQemu } from "@qimg/fixtures";
import { createQcow2, normalizeCreateOptions } from "./create.js";
import type { Qcow2CreateOptions } from "./create.js";
import { openQcow2 } from "./image.js";
import { ExtensionType, decodeExtensions } from "./spec/extensions.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping qemu-img check of created images: qemu-img is not on PATH");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-create-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function create(name: string, o: Qcow2CreateOptions): Promise<string> {
  const file = path.join(tmp, name);
  const b = await FileBackend.open(file, { create: true, truncate: true });
  let data: FileBackend | undefined;
  if (o.dataFile)
    data = await FileBackend.open(path.join(tmp, o.dataFile), { create: true, truncate: true });
  await createQcow2(b, o, data);
  await b.close();
  await data?.close();
  return file;
}

const combos: [string, Qcow2CreateOptions][] = [];
for (const compat of ["0.10", "1.1"] as const) {
  for (const clusterSize of [512, 4096, 65536, 2097152]) {
    combos.push([`c${compat}-cs${clusterSize}`, { size: 64 * 1024 * 1024, compat, clusterSize }]);
  }
}
for (const refcountBits of [1, 2, 4, 8, 16, 32, 64]) {
  combos.push([`rb${refcountBits}`, { size: 8 * 1024 * 1024, refcountBits }]);
  combos.push([
    `rb${refcountBits}-512`,
    { size: 32 * 1024 * 1024, refcountBits, clusterSize: 512 },
  ]);
}
combos.push(["lazy", { size: 1 << 20, lazyRefcounts: true }]);
combos.push(["extl2", { size: 1 << 30, extendedL2: true }]);
combos.push(["zstd", { size: 1 << 20, compressionType: "zstd" }]);
combos.push(["backing", { size: 1 << 20, backingFile: "base.raw", backingFormat: "raw" }]);
combos.push(["datafile", { size: 1 << 20, dataFile: "d.raw" }]);
combos.push(["datafile-raw", { size: 1 << 20, dataFile: "dr.raw", dataFileRaw: true }]);
combos.push(["prealloc-metadata", { size: 3 << 20, preallocation: "metadata" }]);
combos.push(["prealloc-full", { size: 1 << 20, preallocation: "full" }]);
combos.push([
  "prealloc-metadata-512",
  { size: 1 << 20, preallocation: "metadata", clusterSize: 512, refcountBits: 1 },
]);
combos.push([
  "prealloc-extl2-backing",
  {
    size: 1 << 20,
    preallocation: "metadata",
    extendedL2: true,
    backingFile: "base.raw",
    backingFormat: "raw",
  },
]);
combos.push(["big", { size: 2 ** 40, clusterSize: 65536 }]);
combos.push(["odd-size", { size: 1000 }]);

describe("createQcow2", () => {
  it.each(combos)("%s opens in qimg and agrees with the options", async (name, o) => {
    const file = await create(`${name}.qcow2`, o);
    const image = await openQcow2(await FileBackend.open(file, { readOnly: true }), {
      noBacking: true,
    });
    const info = image.info();
    await image.close();
    const n = normalizeCreateOptions(o);
    expect(info.virtualSize).toBe(n.size);
    expect(info.clusterSize).toBe(n.clusterSize);
    expect(info.refcountBits).toBe(n.refcountBits);
    expect(info.compat).toBe(n.version === 2 ? "0.10" : "1.1");
    expect(info.lazyRefcounts).toBe(!!o.lazyRefcounts);
    expect(info.extendedL2).toBe(!!o.extendedL2);
    expect(info.backingFilename).toBe(o.backingFile);
    expect(info.dataFile).toBe(o.dataFile);
  });

  it.skipIf(!haveQemu).each(combos)(
    "%s passes qemu-img check and qemu-img info agrees",
    async (name, o) => {
      if (o.backingFile) fs.writeFileSync(path.join(tmp, o.backingFile), new Uint8Array(1 << 20));
      const file = await create(`${name}.q.qcow2`, o);
      const check = spawnSync("qemu-img", ["check", "--output=json", file], {
        encoding: "utf8",
        cwd: tmp,
      });
      expect(check.status, check.stderr + check.stdout).toBe(0);
      const info = JSON.parse(
        execFileSync("qemu-img", ["info", "--output=json", file], { encoding: "utf8", cwd: tmp }),
      );
      const n = normalizeCreateOptions(o);
      expect(info["virtual-size"]).toBe(n.size);
      expect(info["cluster-size"]).toBe(n.clusterSize);
      const data = info["format-specific"].data;
      expect(data.compat).toBe(n.version === 2 ? "0.10" : "1.1");
      expect(data["refcount-bits"]).toBe(n.refcountBits);
      if (n.version === 3) {
        expect(data["lazy-refcounts"]).toBe(!!o.lazyRefcounts);
        expect(data["extended-l2"]).toBe(!!o.extendedL2);
        expect(data["compression-type"]).toBe(o.compressionType ?? "zlib");
      }
      if (o.dataFile) expect(data["data-file"]).toBe(o.dataFile);
      if (o.preallocation && o.preallocation !== "off") {
        // Every cluster is allocated: qemu-img map shows one present extent.
        const map = JSON.parse(
          execFileSync("qemu-img", ["map", "--output=json", file], { encoding: "utf8", cwd: tmp }),
        );
        expect(map.every((e: { present: boolean }) => e.present)).toBe(true);
      }
    },
  );

  it("refuses invalid combinations with qemu-img's reasons", () => {
    expect(() => normalizeCreateOptions({ size: 1, compat: "0.10", refcountBits: 8 })).toThrow(
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
    );
    expect(() => normalizeCreateOptions({ size: 1, compat: "0.10", lazyRefcounts: true })).toThrow(
      "Lazy refcounts only supported with compatibility level 1.1 and above",
    );
    expect(() => normalizeCreateOptions({ size: 1, extendedL2: true, clusterSize: 8192 })).toThrow(
      "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
    expect(() => normalizeCreateOptions({ size: 1, clusterSize: 1000 })).toThrow(
      "Cluster size must be a power of two between 512 and 2048k",
    );
    expect(() => normalizeCreateOptions({ size: 1, refcountBits: 3 })).toThrow(
      "Refcount width must be a power of two and may not exceed 64 bits",
    );
    expect(() => normalizeCreateOptions({ size: 1, dataFileRaw: true })).toThrow(
      "data-file-raw requires data-file",
    );
    expect(() =>
      normalizeCreateOptions({ size: 1, compat: "0.10", compressionType: "zstd" }),
    ).toThrow("Non-zlib compression type is only supported with compatibility level 1.1 and above");
  });
});

describe("createQcow2 header area and preallocation, as qemu-img 7.2", () => {
  it("refuses a header area that does not fit the first cluster, with qemu-img's messages", () => {
    // v3 with 512-byte clusters and no feature table: 112 + 16 (backing format) + 8 = 136.
    const base = { size: 1 << 20, clusterSize: 512, backingFormat: "raw" } as const;
    expect(() => normalizeCreateOptions({ ...base, backingFile: "b".repeat(376) })).not.toThrow();
    expect(() => normalizeCreateOptions({ ...base, backingFile: "b".repeat(377) })).toThrow(
      `Could not assign backing file '${"b".repeat(377)}' with format 'raw': No space left on device`,
    );
    expect(() =>
      normalizeCreateOptions({ size: 1, backingFile: "b".repeat(1024), backingFormat: "raw" }),
    ).toThrow("with format 'raw': Invalid argument");
    expect(() =>
      normalizeCreateOptions({ size: 1, clusterSize: 512, dataFile: "d".repeat(400) }),
    ).toThrow("Could not update qcow2 header: No space left on device");
  });

  it("writes the feature-name table only with clusters larger than 4 KiB", async () => {
    for (const clusterSize of [512, 4096, 8192]) {
      const file = await create(`ft-${clusterSize}.qcow2`, { size: 1 << 20, clusterSize });
      const bytes = new Uint8Array(fs.readFileSync(file).subarray(0, clusterSize));
      const types = decodeExtensions(bytes, 112, clusterSize).map((e) => e.type);
      expect(types.includes(ExtensionType.featureNameTable), String(clusterSize)).toBe(
        clusterSize > 4096,
      );
    }
  });

  it.skipIf(!haveQemu)(
    "extended L2 preallocation maps like qemu-img's (subclusters unallocated)",
    async () => {
      for (const preallocation of ["metadata", "falloc", "full"] as const) {
        const o = { size: 1000000 + 512, extendedL2: true, preallocation };
        const ours = await create(`xl2-${preallocation}.qcow2`, o);
        const theirs = path.join(tmp, `xl2-${preallocation}.e.qcow2`);
        execFileSync("qemu-img", [
          "create",
          "-q",
          "-f",
          "qcow2",
          "-o",
          `extended_l2=on,preallocation=${preallocation}`,
          theirs,
          String(o.size),
        ]);
        const mapOf = (f: string): unknown =>
          JSON.parse(execFileSync("qemu-img", ["map", "--output=json", f], { encoding: "utf8" }))
            // host offsets depend on the layout, which differs for falloc/full
            .map((e: Record<string, unknown>) => ({ ...e, offset: undefined }));
        expect(mapOf(ours)).toEqual(mapOf(theirs));
      }
    },
  );
});
