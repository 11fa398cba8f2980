/**
 * Internal snapshots (src/snapshot.ts) against real qemu-img 7.2, both ways: snapshots made by
 * the driver are listed, exported (`convert -l`) and applied (`snapshot -a`) by qemu-img with
 * the right content, and qemu-img's snapshots are applied, read and deleted by the driver;
 * every step leaves `qemu-img check` clean, and deleting every snapshot leaks nothing.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import { FileBackend } from "@qimg/io/node";
import { openQcow2, openQcow2Snapshot } from "../src/index.js";
import type { Qcow2Image } from "../src/index.js";
import {
  dataOf,
  firstDiff,
  openRw,
  qemuCheck,
  qemuImg,
  qemuRaw,
  scratchDirs,
  tool,
} from "./twins.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("snapshot-interop.test: qemu-img not found, skipping");
const fresh = scratchDirs("qimg-snapshot-interop-");

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

function clean(file: string, what: string): void {
  const v = qemuCheck(file);
  expect({ code: v.code, corruptions: v.corruptions, leaks: v.leaks }, `${what}: ${v.raw}`).toEqual(
    {
      code: 0,
      corruptions: 0,
      leaks: 0,
    },
  );
}

/** Guest bytes of snapshot `sel` as qemu-img exports it. */
function qemuSnapshotRaw(file: string, sel: string): Uint8Array {
  const out = `${file}.snap.raw`;
  ok(qemuImg(["convert", "-l", sel, "-O", "raw", file, out]), `convert -l ${sel}`);
  const b = new Uint8Array(fs.readFileSync(out));
  fs.rmSync(out);
  return b;
}

/** `qemu-img snapshot -l` without the DATE column (the clock differs between runs). */
function listing(file: string): string {
  return ok(qemuImg(["snapshot", "-l", file]), "snapshot -l")
    .split("\n")
    .map((l) => (/^\d/.test(l) ? l.slice(0, 37) + l.slice(57) : l))
    .join("\n");
}

async function readAll(image: {
  virtualSize: number;
  read(o: number, b: Uint8Array): Promise<void>;
}): Promise<Uint8Array> {
  const b = new Uint8Array(image.virtualSize);
  await image.read(0, b);
  return b;
}

function expectBytes(got: Uint8Array, want: Uint8Array, what: string): void {
  expect(got.length, `${what}: size`).toBe(want.length);
  const d = firstDiff(got, want);
  expect(d, `${what}: first difference at byte ${d}`).toBe(-1);
}

describe.skipIf(!haveQemu)("internal snapshots with qemu-img", () => {
  it("snapshots made by qimg are listed, exported and applied by qemu-img", async () => {
    const dir = fresh();
    const file = path.join(dir, "a.qcow2");
    const size = 3 * 65536 + 7 * 512;
    ok(qemuImg(["create", "-f", "qcow2", file, String(size)]), "create");
    const a = dataOf(1, size);
    const b = dataOf(2, size);
    let image: Qcow2Image = await openRw(file);
    await image.write(0, a);
    await image.createSnapshot("first");
    await image.write(1000, b.subarray(1000, 100_000));
    const second = await image.createSnapshot("second");
    expect(second.id).toBe("2");
    await image.write(150_000, b.subarray(150_000));
    await image.close();
    clean(file, "after qimg made two snapshots");
    const want1 = a;
    const want2 = a.slice();
    want2.set(b.subarray(1000, 100_000), 1000);
    const active = want2.slice();
    active.set(b.subarray(150_000), 150_000);
    expectBytes(qemuSnapshotRaw(file, "first"), want1, "qemu-img convert -l first");
    expectBytes(qemuSnapshotRaw(file, "snapshot.id=2"), want2, "qemu-img convert -l snapshot.id=2");
    expectBytes(qemuRaw(file), active, "active image");
    // qemu-img's listing equals the one it prints for its own snapshots (modulo the date).
    const twin = path.join(dir, "twin.qcow2");
    ok(qemuImg(["create", "-f", "qcow2", twin, String(size)]), "create twin");
    ok(qemuImg(["snapshot", "-c", "first", twin]), "snapshot -c");
    ok(qemuImg(["snapshot", "-c", "second", twin]), "snapshot -c");
    expect(listing(file)).toBe(listing(twin));
    // Both info outputs list the same snapshot facts, in the same key order.
    const info = (f: string): unknown[] =>
      (
        JSON.parse(ok(qemuImg(["info", "--output=json", f]), "info")) as {
          snapshots: Record<string, unknown>[];
        }
      ).snapshots.map((s) => Object.keys(s));
    expect(info(file)).toEqual(info(twin));
    // qemu-img applies a qimg snapshot.
    ok(qemuImg(["snapshot", "-a", "first", file]), "snapshot -a first");
    clean(file, "after qemu-img applied a qimg snapshot");
    expectBytes(qemuRaw(file), want1, "active after qemu-img -a first");
    // qimg deletes them all: nothing leaks.
    image = await openRw(file);
    await image.deleteSnapshot({ name: "second" });
    await image.deleteSnapshot({ id: "1" });
    await image.close();
    clean(file, "after every snapshot was deleted");
    expect(ok(qemuImg(["snapshot", "-l", file]), "snapshot -l")).toBe("");
    expectBytes(qemuRaw(file), want1, "active after the deletes");
  });

  it("qemu-img's snapshots are applied, read and deleted by qimg", async () => {
    const dir = fresh();
    const file = path.join(dir, "b.qcow2");
    const size = 5 * 4096 * 16 + 1536;
    ok(qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", file, String(size)]), "create");
    const src = path.join(dir, "d.bin");
    fs.writeFileSync(src, dataOf(3, size));
    ok(tool("qemu-io", ["-c", `write -s ${src} 0 ${size}`, file]), "qemu-io write");
    ok(qemuImg(["snapshot", "-c", "base", file]), "snapshot -c base");
    ok(
      tool("qemu-io", ["-c", "write -P 0xaa 8192 70000", "-c", "write -z 100000 9000", file]),
      "qemu-io",
    );
    ok(qemuImg(["snapshot", "-c", "mid", file]), "snapshot -c mid");
    ok(tool("qemu-io", ["-c", "discard 0 65536", file]), "qemu-io discard");
    const base = qemuSnapshotRaw(file, "base");
    const mid = qemuSnapshotRaw(file, "mid");
    const active = qemuRaw(file);
    // Read-only views through the library.
    const ro = await openQcow2(await FileBackend.open(file, { readOnly: true }));
    const v1 = await openQcow2Snapshot(ro, "base");
    expectBytes(await readAll(v1), base, "qimg view of base");
    const v2 = await ro.openSnapshot({ id: "2", name: "mid" });
    expectBytes(await readAll(v2), mid, "qimg view of mid");
    await v1.close();
    await v2.close();
    expectBytes(await readAll(ro), active, "active, still open after the views closed");
    await ro.close();
    // Apply, write, delete, with qemu-img checking each step.
    let image = await openRw(file);
    await image.applySnapshot("mid");
    await image.close();
    clean(file, "after qimg applied mid");
    expectBytes(qemuRaw(file), mid, "active after qimg -a mid");
    expectBytes(qemuSnapshotRaw(file, "base"), base, "base after the apply");
    image = await openRw(file);
    await image.write(4096, new Uint8Array(20_000).fill(7));
    await image.close();
    expectBytes(qemuSnapshotRaw(file, "mid"), mid, "mid after writes to the applied image");
    image = await openRw(file);
    await image.deleteSnapshot({ name: "base" });
    await image.close();
    clean(file, "after qimg deleted base");
    expectBytes(qemuSnapshotRaw(file, "mid"), mid, "mid after base was deleted");
    image = await openRw(file);
    await image.deleteSnapshot({ name: "mid" });
    await image.close();
    clean(file, "after qimg deleted every snapshot");
    const want = mid.slice();
    want.fill(7, 4096, 24_096);
    expectBytes(qemuRaw(file), want, "active at the end");
  });

  it("a snapshot of an overlay reads through the backing file, in qimg and in qemu-img", async () => {
    const dir = fresh();
    const base = path.join(dir, "base.qcow2");
    const top = path.join(dir, "top.qcow2");
    const size = 392 * 512;
    ok(qemuImg(["create", "-f", "qcow2", base, String(size)]), "create base");
    ok(tool("qemu-io", ["-c", `write -P 0x5a 0 ${size}`, base]), "fill base");
    ok(qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top]), "create top");
    let image = await openRw(top);
    await image.write(70_000, new Uint8Array(3000).fill(1));
    await image.createSnapshot("s");
    await image.write(60_000, new Uint8Array(20_000).fill(2));
    const view = await image.openSnapshot("s");
    const mine = await readAll(view);
    await view.close();
    await image.close();
    clean(top, "overlay after the snapshot");
    const want = new Uint8Array(size).fill(0x5a);
    want.fill(1, 70_000, 73_000);
    expectBytes(mine, want, "qimg view of the overlay's snapshot");
    expectBytes(qemuSnapshotRaw(top, "s"), want, "qemu-img convert -l of the overlay's snapshot");
    image = await openRw(top);
    await image.applySnapshot("s");
    await image.deleteSnapshot({ name: "s" });
    await image.close();
    clean(top, "overlay after apply and delete");
    expectBytes(qemuRaw(top), want, "overlay after apply");
  });

  it("apply brings back the snapshot's disk size; compressed clusters spanning host clusters count per host cluster", async () => {
    const dir = fresh();
    const file = path.join(dir, "c.qcow2");
    ok(qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=512", file, "64k"]), "create");
    // Text compresses to less than a cluster, so compressed clusters pack and straddle host clusters.
    const src = path.join(dir, "t.bin");
    fs.writeFileSync(
      src,
      dataOf(9, 65536, true).map((x, i) => (i % 97 === 0 ? (x + i) & 255 : x)),
    );
    // One request per cluster: QEMU 7.2 compresses a multi-cluster request in parallel tasks
    // that on 512-byte clusters now and then trip its own overlap check (see twins.ts).
    const perCluster: string[] = [];
    for (let at = 0; at < 32768; at += 512) {
      const part = path.join(dir, `t${at}.bin`);
      fs.writeFileSync(part, fs.readFileSync(src).subarray(at, at + 512));
      perCluster.push("-c", `write -c -s ${part} ${at} 512`);
    }
    const w = tool("qemu-io", [...perCluster, file]);
    expect(w.code, `${w.stdout}${w.stderr}`).toBe(0);
    expect(w.stdout).not.toMatch(/failed/);
    let image = await openRw(file);
    await image.createSnapshot("small");
    await image.resize(256 * 1024);
    await image.write(200_000, new Uint8Array(5000).fill(3));
    await image.createSnapshot("big");
    await image.close();
    clean(file, "after two snapshots over compressed clusters");
    const small = qemuSnapshotRaw(file, "small");
    expect(small.length).toBe(256 * 1024); // qemu-img reads at the image's size
    image = await openRw(file);
    await image.applySnapshot("small");
    expect(image.virtualSize).toBe(65536);
    await image.close();
    clean(file, "after applying the smaller snapshot");
    const info = JSON.parse(ok(qemuImg(["info", "--output=json", file]), "info")) as Record<
      string,
      unknown
    >;
    expect(info["virtual-size"]).toBe(65536);
    expectBytes(qemuRaw(file), small.subarray(0, 65536), "active after applying small");
    ok(qemuImg(["snapshot", "-a", "big", file]), "qemu-img -a big");
    clean(file, "after qemu-img applied big");
    image = await openRw(file);
    expect(image.virtualSize).toBe(256 * 1024);
    await image.deleteSnapshot({ name: "small" });
    await image.deleteSnapshot({ name: "big" });
    await image.close();
    clean(file, "after deleting both");
    expect(small.subarray(0, 32768)).toEqual(
      new Uint8Array(fs.readFileSync(src)).subarray(0, 32768),
    );
  });
});
