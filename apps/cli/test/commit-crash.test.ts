/**
 * Power loss during `commit` and safe `rebase`, at every step: the same code the commands run
 * (commitInto + makeEmpty; copyDifferences + changeBackingFile) on images over FaultBackend,
 * with the power cut after a random number of writes/flushes/truncates across all the files
 * written. Afterwards:
 * - commit: the top (reopened over the surviving base) reads exactly as before the commit,
 *   the base is unchanged outside the committed ranges, and inside them each byte is the old
 *   or the new one;
 * - rebase: the top (reopened over whichever backing file its header names) reads exactly as
 *   before;
 * - `qemu-img check -r all` repairs every surviving image, and a second check is clean.
 */
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend, seededRandom } from "@qimg/io";
import type { BackingRequest, DiskImage, WritableDiskImage } from "@qimg/io";
import { createQcow2, openQcow2 } from "@qimg/qcow2";
import { createQed, openQed } from "@qimg/qed";
import { captureContext } from "../src/context.js";
import { commitInto } from "../src/commands/commit.js";
import { copyDifferences } from "../src/commands/rebase.js";
import { hasQemu } from "./qemu.js";

const LONG = process.env.QIMG_LONG === "1";
const SEED = Number(process.env.QIMG_SEED ?? 700);
const tmp = mkdtempSync(join(tmpdir(), "qimg-commit-crash-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

type Fmt = "qcow2" | "qed";

async function create(
  fmt: Fmt,
  size: number,
  cs: number,
  backing?: [string, Fmt],
): Promise<MemoryBackend> {
  const mem = new MemoryBackend();
  const b = backing === undefined ? {} : { backingFile: backing[0], backingFormat: backing[1] };
  if (fmt === "qcow2") await createQcow2(mem, { size, clusterSize: cs, ...b });
  else await createQed(mem, { size, clusterSize: Math.max(cs, 4096), ...b });
  return mem;
}

function open(
  fmt: Fmt,
  backend: MemoryBackend | FaultBackend,
  readOnly: boolean,
  files: Record<string, () => Promise<DiskImage>>,
): Promise<WritableDiskImage> {
  const openBacking = (r: BackingRequest): Promise<DiskImage> => {
    const f = files[r.filename];
    if (f === undefined) throw new Error(`no backing file ${r.filename}`);
    return f();
  };
  return fmt === "qcow2"
    ? openQcow2(backend, { readOnly, openBacking })
    : openQed(backend, { readOnly, openBacking });
}

/** Random data, zero writes and discards through the driver. */
async function scribble(image: WritableDiskImage, rnd: () => number): Promise<void> {
  const size = image.virtualSize;
  const cs = image.clusterSize;
  for (let i = 0; i < 12; i++) {
    const len = Math.min(size - 1, 1 + Math.floor(rnd() * 3 * cs));
    const off = Math.floor(rnd() * (size - len));
    const x = rnd();
    if (x < 0.65) {
      const d = new Uint8Array(len);
      for (let j = 0; j < len; j++) d[j] = 1 + Math.floor(rnd() * 255);
      await image.write(off, d);
    } else if (x < 0.85) {
      const a = Math.floor(off / 512) * 512;
      await image.writeZeroes(a, Math.min(size - a, Math.ceil(len / 512) * 512), {
        mayUnmap: rnd() < 0.5,
      });
    } else {
      const a = Math.floor(off / cs) * cs;
      if (a + cs <= size) await image.discard(a, cs);
    }
  }
}

async function readAll(image: DiskImage): Promise<Uint8Array> {
  const b = new Uint8Array(image.virtualSize);
  await image.read(0, b);
  return b;
}

/**
 * `qemu-img check -r all` of `name` (written with `others`, its backing files, in a directory
 * of its own), then a plain check that must be clean.
 */
function repairs(
  dirName: string,
  name: string,
  fmt: Fmt,
  bytes: Uint8Array,
  others: Record<string, Uint8Array>,
  label: string,
): void {
  if (!hasQemu) return;
  const dir = join(tmp, dirName);
  mkdirSync(dir, { recursive: true });
  for (const [n, b] of Object.entries(others)) writeFileSync(join(dir, n), b);
  const file = join(dir, name);
  writeFileSync(file, bytes);
  const r = spawnSync("qemu-img", ["check", "-r", "all", "-f", fmt, file], { encoding: "utf8" });
  // QEMU's QED check repairs corruptions but not leaks (exit 3: leaked clusters only).
  const ok = fmt === "qed" ? [0, 3] : [0];
  expect(ok, `${label}: check -r all ${name}: ${r.stdout}${r.stderr}`).toContain(r.status);
  const c = spawnSync("qemu-img", ["check", "-f", fmt, file], { encoding: "utf8" });
  expect(ok, `${label}: check ${name} after repair: ${c.stdout}${c.stderr}`).toContain(c.status);
}

/** Cut the power of every faulted file after `lossAt` writes/flushes/truncates in all. */
function powerCut(lossAt: number): (op: string) => boolean {
  let ops = 0;
  return (op) => (op === "write" || op === "flush" || op === "truncate") && ++ops > lossAt;
}

async function commitCrash(seed: number): Promise<void> {
  const rnd = seededRandom(seed);
  const label = `seed ${seed}`;
  const cs = [512, 4096, 65536][seed % 3]!;
  const baseFmt: Fmt = rnd() < 0.5 ? "qcow2" : "qed";
  const topSize = 300_000 + Math.floor(rnd() * 700_000);
  const baseSize = rnd() < 0.5 ? Math.floor(topSize * 0.6) : topSize;
  const baseMem = await create(baseFmt, baseSize, cs);
  {
    const b = await open(baseFmt, baseMem, false, {});
    await scribble(b, rnd);
    await b.close();
  }
  const baseBytes = baseMem.bytes();
  const baseRo = (): Promise<DiskImage> => open(baseFmt, MemoryBackend.from(baseBytes), true, {});
  const topMem = await create("qcow2", topSize, cs, ["base", baseFmt]);
  {
    const t = await open("qcow2", topMem, false, { base: baseRo });
    await scribble(t, rnd);
    await t.close();
  }
  const topBytes = topMem.bytes();
  const viewBefore = await readAll(
    await open("qcow2", MemoryBackend.from(topBytes), true, { base: baseRo }),
  );
  const baseBefore = await readAll(await baseRo());

  const cut = powerCut(Math.floor(rnd() * 80));
  const baseFault = await FaultBackend.wrap(MemoryBackend.from(baseBytes), { failWhen: cut });
  const topFault = await FaultBackend.wrap(MemoryBackend.from(topBytes), { failWhen: cut });
  try {
    const base = await open(baseFmt, baseFault, false, {});
    const view = await open("qcow2", MemoryBackend.from(topBytes), true, { base: baseRo });
    await commitInto(captureContext(), view, base, 1);
    await base.close();
    const top = await openQcow2(topFault, { readOnly: false, noBacking: true });
    await top.makeEmpty();
    await top.close();
  } catch {
    // The power is gone.
  }
  const tear = { tearLastWrite: rnd() < 0.5, seed };
  const baseCrashed = baseFault.powerLoss(tear);
  const topAfter = topFault.powerLoss(tear).bytes();
  const baseRaw = baseCrashed.bytes();
  // Reopen read-write first: a dirty image (or QED's need-check) repairs itself as QEMU's
  // open does.
  const b2 = await open(baseFmt, baseCrashed, false, {});
  await b2.close();
  const baseAfter = baseCrashed.bytes();
  const baseNow = (): Promise<DiskImage> => open(baseFmt, MemoryBackend.from(baseAfter), true, {});
  const view = await readAll(
    await open("qcow2", MemoryBackend.from(topAfter), true, { base: baseNow }),
  );
  expect(Buffer.compare(view, viewBefore), `${label}: the top's guest view changed`).toBe(0);
  const baseRead = await readAll(await baseNow());
  const committed = await open("qcow2", MemoryBackend.from(topBytes), true, { base: baseRo });
  for (let i = 0; i < baseRead.length; i++) {
    const old = i < baseBefore.length ? baseBefore[i]! : 0;
    if (baseRead[i] === old) continue;
    if (baseRead[i] !== viewBefore[i]) {
      const s = await committed.blockStatus(i, 1);
      expect.fail(
        `${label}: base byte ${i} reads ${baseRead[i]}, neither old ${old} nor committed ${viewBefore[i]} (top status ${JSON.stringify(s)})`,
      );
    }
  }
  // qemu-img repairs the crashed files as they are (before qimg's own open repaired them).
  repairs(`c${seed}`, "base", baseFmt, baseRaw, {}, label);
  repairs(`c${seed}`, "top.qcow2", "qcow2", topAfter, { base: baseAfter }, label);
}

async function rebaseCrash(seed: number): Promise<void> {
  const rnd = seededRandom(seed);
  const label = `seed ${seed}`;
  const cs = [4096, 65536, 512][seed % 3]!;
  const topFmt: Fmt = seed % 2 === 0 ? "qcow2" : "qed";
  const size = 300_000 + Math.floor(rnd() * 700_000);
  const files: Record<string, () => Promise<DiskImage>> = {};
  const bytes: Record<string, Uint8Array> = {};
  for (const name of ["b1", "b2"]) {
    const mem = await create("qcow2", Math.floor(size * (0.5 + rnd() * 0.7)), cs);
    const img = await open("qcow2", mem, false, {});
    await scribble(img, rnd);
    await img.close();
    bytes[name] = mem.bytes();
    files[name] = () => open("qcow2", MemoryBackend.from(bytes[name]!), true, {});
  }
  const removing = rnd() < 0.3;
  const topMem = await create(topFmt, size, cs, ["b1", "qcow2"]);
  {
    const t = await open(topFmt, topMem, false, files);
    await scribble(t, rnd);
    await t.close();
  }
  const topBytes = topMem.bytes();
  const viewBefore = await readAll(await open(topFmt, MemoryBackend.from(topBytes), true, files));
  const topFault = await FaultBackend.wrap(MemoryBackend.from(topBytes), {
    failWhen: powerCut(Math.floor(rnd() * 60)),
  });
  try {
    const top = await open(topFmt, topFault, false, files);
    const nb = removing ? undefined : await files.b2!();
    await copyDifferences(captureContext(), top, nb, { compress: false, progress: false });
    const change = removing ? { filename: undefined } : { filename: "b2", format: "qcow2" };
    if ("changeBackingFile" in top) {
      await (top as { changeBackingFile(c: typeof change): Promise<void> }).changeBackingFile(
        change,
      );
    }
    await top.close();
    await nb?.close();
  } catch {
    // The power is gone.
  }
  const crashed = topFault.powerLoss({ tearLastWrite: rnd() < 0.5, seed });
  const raw = crashed.bytes();
  const rw = await open(topFmt, crashed, false, files);
  await rw.close();
  const view = await readAll(await open(topFmt, MemoryBackend.from(crashed.bytes()), true, files));
  expect(Buffer.compare(view, viewBefore), `${label}: the top's guest view changed`).toBe(0);
  repairs(`r${seed}`, `top.${topFmt}`, topFmt, raw, bytes, label);
}

describe("power loss during commit and safe rebase", () => {
  const runs = LONG ? 400 : 30;
  it(`commit: ${runs} seeded crash points from seed ${SEED}`, async () => {
    for (let s = SEED; s < SEED + runs; s++) await commitCrash(s);
  }, 600_000);
  it(`rebase: ${runs} seeded crash points from seed ${SEED}`, async () => {
    for (let s = SEED; s < SEED + runs; s++) await rebaseCrash(s);
  }, 600_000);
});
