/**
 * Power loss during amend: a refcount width change and a compat downgrade (with and without a
 * backing file, so zero clusters become allocated zeros or unallocated), cut after every write
 * or flush, with the last write kept whole or torn at a sector boundary. What survives must be
 * repairable by `qemu-img check -r all` into a clean image that reads exactly as before the
 * amend (`qemu-img compare` with the pre-amend image).
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend, RawImage } from "@qimg/io";
import type { BackingOpener } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { requireQemu } from "@qimg/fixtures";
import { openQcow2 } from "../src/index.js";
import type { Qcow2AmendOptions } from "../src/index.js";
import { createQcow2In, sh } from "./qemu-sh.js";
import { qemuImg, scratchDirs } from "./twins.js";

const haveQemu = requireQemu();
const LONG = process.env.QIMG_LONG === "1";
const freshDir = scratchDirs("qimg-amend-crash-");

function openerIn(dir: string): BackingOpener {
  const opener: BackingOpener = async (req) => {
    const backend = await FileBackend.open(path.resolve(dir, req.filename), { readOnly: true });
    if (req.format === "qcow2") return openQcow2(backend, { openBacking: opener });
    return RawImage.open(backend);
  };
  return opener;
}

/** Run the amend on `bytes` with power lost after `cut` writes/flushes (Infinity: never). */
async function amendWithCut(
  dir: string,
  bytes: Uint8Array,
  options: Qcow2AmendOptions,
  cut: number,
): Promise<{ fault: FaultBackend; ops: number; done: boolean }> {
  let ops = 0;
  const fault = await FaultBackend.wrap(MemoryBackend.from(bytes, { name: "top.qcow2" }), {
    failWhen: (op) => (op === "write" || op === "flush" || op === "truncate") && ++ops > cut,
  });
  let done = false;
  try {
    const image = await openQcow2(fault, { readOnly: false, openBacking: openerIn(dir) });
    try {
      await image.amend(options);
      done = true;
    } finally {
      await image.close().catch(() => undefined);
    }
  } catch {
    // power is gone
  }
  return { fault, ops, done };
}

interface Scenario {
  readonly name: string;
  readonly backing: boolean;
  readonly create: string;
  readonly amend: Qcow2AmendOptions;
}

const SCENARIOS: Scenario[] = [
  {
    name: "refcount_bits 16 -> 8",
    backing: false,
    create: "cluster_size=4096",
    amend: { refcountBits: 8 },
  },
  {
    name: "refcount_bits 16 -> 64",
    backing: true,
    create: "cluster_size=4096,lazy_refcounts=on",
    amend: { refcountBits: 64 },
  },
  {
    name: "compat=0.10 with a backing file",
    backing: true,
    create: "cluster_size=4096",
    amend: { compat: "0.10" },
  },
  {
    name: "compat=0.10 without a backing file",
    backing: false,
    create: "cluster_size=4096,lazy_refcounts=on",
    amend: { compat: "0.10" },
  },
  {
    name: "compat=1.1 and refcount_bits 16 -> 8 from a version 2 image with a snapshot",
    backing: true,
    create: "cluster_size=4096,compat=0.10",
    amend: { compat: "1.1", refcountBits: 8 },
  },
];

describe.skipIf(!haveQemu)("amend survives power loss at any write", () => {
  for (const sc of SCENARIOS) {
    it(
      sc.name,
      async () => {
        const dir = freshDir();
        if (sc.backing) {
          sh("qemu-img", ["create", "-q", "-f", "raw", "base.raw", "1000k"], dir);
          sh("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1000k", "base.raw"], dir);
        }
        const backing = sc.backing ? { file: "base.raw", format: "raw" } : undefined;
        createQcow2In(dir, "pre.qcow2", "1000k", sc.create, backing);
        sh(
          "qemu-io",
          [
            "-c",
            "write -P 1 0 40k",
            "-c",
            "write -z 40k 24k",
            "-c",
            "write -z -u 100k 16k",
            "-c",
            "write -c -P 2 256k 8k",
            "-c",
            "write -P 3 600k 3k",
            "-c",
            "write -z 900k 100k",
            "pre.qcow2",
          ],
          dir,
        );
        sh("qemu-img", ["snapshot", "-c", "s", "pre.qcow2"], dir);
        sh("qemu-io", ["-c", "write -z 0 8k", "-c", "write -P 4 300k 4k", "pre.qcow2"], dir);
        const bytes = new Uint8Array(fs.readFileSync(path.join(dir, "pre.qcow2")));
        sh(
          "qemu-img",
          ["convert", "-l", "snapshot.name=s", "-O", "raw", "pre.qcow2", "pre-snap.raw"],
          dir,
        );
        const preSnap = fs.readFileSync(path.join(dir, "pre-snap.raw"));
        const full = await amendWithCut(dir, bytes, sc.amend, Infinity);
        expect(full.done).toBe(true);
        const total = full.ops;
        expect(total).toBeGreaterThan(3);
        const step = LONG ? 1 : Math.max(1, Math.floor(total / 25));
        let checked = 0;
        for (let cut = 0; cut < total; cut += step) {
          for (const tear of [false, true]) {
            const { fault } = await amendWithCut(dir, bytes, sc.amend, cut);
            const survivor = fault.powerLoss({ tearLastWrite: tear, seed: cut });
            const file = path.join(dir, "crash.qcow2");
            fs.writeFileSync(file, survivor.bytes());
            const where = `${sc.name}: power lost after ${cut} of ${total} writes/flushes${tear ? " (torn)" : ""}`;
            const repair = qemuImg(["check", "-r", "all", "crash.qcow2"], dir);
            expect(repair.code, `${where}\n${repair.stdout}${repair.stderr}`).toBe(0);
            const again = qemuImg(["check", "crash.qcow2"], dir);
            expect(again.code, `${where}\n${again.stdout}${again.stderr}`).toBe(0);
            const cmp = qemuImg(["compare", "pre.qcow2", "crash.qcow2"], dir);
            expect(cmp.code, `${where}\n${cmp.stdout}${cmp.stderr}`).toBe(0);
            // The snapshot reads as before too.
            const snap = qemuImg(
              ["convert", "-l", "snapshot.name=s", "-O", "raw", "crash.qcow2", "crash-snap.raw"],
              dir,
            );
            expect(snap.code, `${where}\n${snap.stderr}`).toBe(0);
            expect(
              fs.readFileSync(path.join(dir, "crash-snap.raw")).equals(preSnap),
              `${where}: snapshot`,
            ).toBe(true);
            checked++;
          }
        }
        expect(checked).toBeGreaterThan(4);
      },
      120_000,
    );
  }
});
