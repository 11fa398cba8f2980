/**
 * `qimg snapshot` against `qemu-img snapshot` 7.2 side by side: the same command on twin
 * copies gives the same listing, message (modulo the program name) and exit code, and a
 * refused command leaves the file byte-identical. Snapshots qimg makes are applied and
 * checked by qemu-img, and the reverse.
 */
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, holdWithQemuIo, qemuImg, qemuIo, releaseQemuIo } from "./qemu.js";

if (!hasQemu) console.log("snapshot-cli.test: qemu-img not found, skipping");
const tmp = mkdtempSync(join(tmpdir(), "qimg-snapshot-cli-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
afterEach(() => releaseQemuIo());
let n = 0;

/** A fresh image made by `make` in its own file (returns the path). */
function image(make: (file: string) => void, ext = "qcow2"): string {
  const file = join(tmp, `i${n++}.${ext}`);
  make(file);
  return file;
}

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

/** The first line qemu-img printed on stderr, in qimg's words. */
function asQimg(stderr: string): string {
  return stderr.replaceAll("qemu-img:", "qimg:");
}

/**
 * Run `args` (the file last) through qemu-img and qimg on twin copies of `file`: same exit
 * code, same stdout, same stderr (modulo the program name and qemu-img's "Try --help" line).
 * Returns both copies.
 */
async function twins(
  file: string,
  args: readonly string[],
): Promise<{ q: string; m: string; code: number }> {
  const q = `${file}.q`;
  const m = `${file}.m`;
  copyFileSync(file, q);
  copyFileSync(file, m);
  const a = qemuImg(["snapshot", ...args, q]);
  const b = await qimg(["snapshot", ...args, m]);
  const norm = (s: string, f: string): string =>
    s
      .replaceAll(f, "FILE")
      .split("\n")
      .filter((l) => !l.startsWith("Try 'qemu-img --help'"))
      .join("\n");
  expect(b.code, `${args.join(" ")}: qemu-img said ${a.stderr}, qimg ${b.stderr}`).toBe(a.code);
  expect(norm(b.stdout, m), args.join(" ")).toBe(norm(a.stdout, q));
  expect(norm(b.stderr, m), args.join(" ")).toBe(norm(asQimg(a.stderr), q));
  return { q, m, code: a.code };
}

function sameBytes(a: string, b: string): boolean {
  return Buffer.compare(readFileSync(a), readFileSync(b)) === 0;
}

const qcow2 = (extra: string[] = [], size = "1M") =>
  image((f) => {
    ok(qemuImg(["create", "-f", "qcow2", ...extra, f, size]), "create");
    ok(qemuIo(["-c", "write -P 0x11 0 70000", f]), "qemu-io write");
  });

describe.skipIf(!hasQemu)("qimg snapshot vs qemu-img snapshot", () => {
  it("lists qemu-img's snapshots exactly as qemu-img does (both tables, -q too)", async () => {
    const f = qcow2();
    ok(qemuImg(["snapshot", "-c", "one", f]), "snapshot -c");
    ok(qemuImg(["snapshot", "-c", "a name longer than sixteen bytes", f]), "snapshot -c");
    ok(qemuImg(["snapshot", "-c", "one", f]), "snapshot -c (same name again)");
    await twins(f, ["-l"]);
    await twins(f, ["-q", "-l"]);
    await twins(f, ["-U", "-l"]);
    const empty = qcow2();
    await twins(empty, ["-l"]);
  });

  it("refuses as qemu-img does, leaving the file byte-identical", async () => {
    const f = qcow2();
    ok(qemuImg(["snapshot", "-c", "there", f]), "snapshot -c");
    for (const args of [
      ["-a", "missing"],
      ["-d", "missing"],
      ["-d", "1"], // qemu-img deletes by name only
      ["-l", "-c", "x"],
      ["-a", "there", "-d", "there"],
    ]) {
      const { m } = await twins(f, args);
      expect(sameBytes(m, f), `${args.join(" ")} changed the file`).toBe(true);
    }
    // No action: qemu-img opens the image and does nothing.
    const { m: untouched } = await twins(f, []);
    expect(sameBytes(untouched, f)).toBe(true);
    // No file, or two.
    const none = await qimg(["snapshot", "-l"]);
    expect([none.code, none.stderr]).toEqual([1, "qimg: Expecting one image file name\n"]);
    const two = await qimg(["snapshot", "-l", f, f]);
    expect([two.code, two.stderr]).toEqual([1, "qimg: Expecting one image file name\n"]);
  });

  it("QED and raw images: qemu-img's messages and exit codes, files unchanged", async () => {
    const qed = image((f) => ok(qemuImg(["create", "-f", "qed", f, "1M"]), "create qed"), "qed");
    const raw = image((f) => writeFileSync(f, new Uint8Array(1 << 20).fill(1)), "raw");
    for (const f of [qed, raw]) {
      for (const args of [["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"]]) {
        const { m } = await twins(f, args);
        expect(sameBytes(m, f), `${f} ${args.join(" ")} changed the file`).toBe(true);
      }
    }
  });

  it("an external data file and a missing backing file: qemu-img's refusals", async () => {
    const df = image((f) =>
      ok(qemuImg(["create", "-f", "qcow2", "-o", `data_file=${f}.data`, f, "1M"]), "create"),
    );
    for (const args of [["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"]]) {
      const { m } = await twins(df, args);
      expect(sameBytes(m, df), `data file ${args.join(" ")} changed the file`).toBe(true);
    }
    const ov = image((f) =>
      ok(
        qemuImg([
          "create",
          "-f",
          "qcow2",
          "-u",
          "-b",
          join(tmp, "absent.qcow2"),
          "-F",
          "qcow2",
          f,
          "1M",
        ]),
        "create overlay",
      ),
    );
    for (const args of [["-l"], ["-c", "x"]]) {
      const { m } = await twins(ov, args);
      expect(sameBytes(m, ov)).toBe(true);
    }
  });

  it("names longer than 255 bytes are cut as qemu-img cuts them", async () => {
    const f = qcow2();
    const { q, m } = await twins(f, ["-c", "n".repeat(300)]);
    const names = (file: string) =>
      (
        JSON.parse(ok(qemuImg(["info", "--output=json", file]), "info")) as {
          snapshots: { name: string }[];
        }
      ).snapshots.map((s) => s.name);
    expect(names(m)).toEqual(names(q));
    expect(names(m)[0]).toHaveLength(255);
  });

  it("an image with persistent bitmaps cannot be reverted (qemu-img's refusal); -c and -d work", async () => {
    const f = qcow2();
    ok(qemuImg(["bitmap", "--add", f, "b0"]), "bitmap --add");
    ok(qemuImg(["snapshot", "-c", "s", f]), "snapshot -c");
    for (const args of [
      ["-a", "s"],
      ["-a", "missing"],
    ]) {
      const { m } = await twins(f, args);
      expect(sameBytes(m, f), `${args.join(" ")} changed the file`).toBe(true);
    }
    const { m } = await twins(f, ["-c", "t"]);
    ok(qemuImg(["check", m]), "check after qimg -c with a bitmap");
    const { m: m2 } = await twins(m, ["-d", "s"]);
    ok(qemuImg(["check", m2]), "check after qimg -d with a bitmap");
  });

  it("-c writes the same bytes as qemu-img's -c, but for the date", async () => {
    for (const f of [qcow2(), qcow2(["-o", "cluster_size=4096,compat=0.10"], "300000")]) {
      const q = `${f}.q`;
      const m = `${f}.m`;
      copyFileSync(f, q);
      copyFileSync(f, m);
      ok(qemuImg(["snapshot", "-c", "same", q]), "qemu-img -c");
      expect((await qimg(["snapshot", "-c", "same", m])).code).toBe(0);
      const a = readFileSync(q);
      const b = readFileSync(m);
      expect(b.length).toBe(a.length);
      const table = Number(a.readBigUInt64BE(64));
      const differ: number[] = [];
      for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) differ.push(i);
      // Only date_sec / date_nsec (bytes 16..23 of the entry) may differ.
      expect(differ.filter((i) => i < table + 16 || i >= table + 24)).toEqual([]);
    }
  });

  it("-d writes what qemu-img's -d writes (but for zeroing the freed clusters)", async () => {
    const f = qcow2(["-o", "cluster_size=4096"], "300000");
    ok(qemuImg(["snapshot", "-c", "one", f]), "snapshot -c");
    ok(qemuIo(["-c", "write -P 0x33 5000 90000", f]), "qemu-io write");
    ok(qemuImg(["snapshot", "-c", "two", f]), "snapshot -c");
    ok(qemuIo(["-c", "write -P 0x44 0 9000", f]), "qemu-io write");
    const { q, m } = await twins(f, ["-d", "one"]);
    // QEMU also discards what it freed (discard-snapshot: the clusters read back as zeros);
    // qimg leaves freed clusters' bytes alone. Everything else is the same.
    const a = readFileSync(q);
    const b = readFileSync(m);
    expect(b.length).toBe(a.length);
    const cs = 4096;
    const bad: number[] = [];
    for (let c = 0; c * cs < a.length; c++) {
      const qa = a.subarray(c * cs, (c + 1) * cs);
      if (Buffer.compare(qa, b.subarray(c * cs, (c + 1) * cs)) !== 0 && qa.some((x) => x !== 0))
        bad.push(c);
    }
    expect(bad, "clusters that differ where qemu-img did not zero them").toEqual([]);
    ok(qemuImg(["check", m]), "check");
    ok(qemuImg(["compare", q, m]), "compare");
  });

  it("a duplicate name is accepted (a new ID), as qemu-img does", async () => {
    const f = qcow2();
    ok(qemuImg(["snapshot", "-c", "dup", f]), "snapshot -c");
    const { q, m } = await twins(f, ["-c", "dup"]);
    const ids = (file: string) =>
      (
        JSON.parse(ok(qemuImg(["info", "--output=json", file]), "info")) as {
          snapshots: { id: string; name: string }[];
        }
      ).snapshots.map((s) => `${s.id}:${s.name}`);
    expect(ids(m)).toEqual(ids(q));
    expect(ids(m)).toEqual(["1:dup", "2:dup"]);
    ok(qemuImg(["check", m]), "check after qimg -c");
    // -d deletes the first snapshot of that name, -a finds an ID before a name.
    await twins(f, ["-d", "dup"]);
    const { m: m2 } = await twins(m, ["-a", "1"]);
    ok(qemuImg(["check", m2]), "check after qimg -a");
  });

  it("a snapshot made by qimg is applied by qemu-img, and the reverse, with the right content", async () => {
    const f = qcow2(["-o", "cluster_size=4096"], "300000");
    const r = await qimg(["snapshot", "-c", "before", f]);
    expect([r.code, r.stdout, r.stderr]).toEqual([0, "", ""]);
    ok(qemuIo(["-c", "write -P 0x22 4096 100000", f]), "qemu-io write");
    ok(qemuImg(["snapshot", "-c", "after", f]), "qemu-img snapshot -c");
    ok(qemuImg(["check", f]), "check");
    // qemu-img applies qimg's snapshot...
    ok(qemuImg(["snapshot", "-a", "before", f]), "qemu-img -a before");
    ok(
      qemuIo(["-c", "read -P 0x11 0 70000", "-c", "read -P 0 70000 1000", f]),
      "content of before",
    );
    // ...and qimg applies qemu-img's.
    const a = await qimg(["snapshot", "-a", "after", f]);
    expect([a.code, a.stderr]).toEqual([0, ""]);
    ok(qemuImg(["check", f]), "check after qimg -a");
    ok(
      qemuIo(["-c", "read -P 0x11 0 4096", "-c", "read -P 0x22 4096 100000", f]),
      "content of after",
    );
    for (const name of ["before", "after"]) {
      const d = await qimg(["snapshot", "-d", name, f]);
      expect([d.code, d.stderr]).toEqual([0, ""]);
    }
    expect(ok(qemuImg(["check", "--output=json", f]), "check")).toMatch(
      /"leaks": 0|^(?![\s\S]*leaks)/,
    );
    const check = qemuImg(["check", f]);
    expect(check.stdout + check.stderr).toMatch(/No errors were found on the image/);
    expect(check.stdout).not.toMatch(/leaked/);
  });

  it("qimg info and check match qemu-img's on an image with qimg-made snapshots", async () => {
    const f = qcow2(["-o", "cluster_size=65536"], "3000000");
    for (const name of ["first", "second", "third"]) {
      expect((await qimg(["snapshot", "-c", name, f])).code).toBe(0);
      ok(qemuIo(["-c", `write -P 0x${name.length}${name.length} 1000 200000`, f]), "qemu-io write");
    }
    expect((await qimg(["snapshot", "-d", "second", f])).code).toBe(0);
    for (const args of [
      ["info"],
      ["info", "--output=json"],
      ["check"],
      ["check", "--output=json"],
    ]) {
      const a = qemuImg([...args, f]);
      const b = await qimg([...args, f]);
      expect([b.code, b.stdout], args.join(" ")).toEqual([a.code, a.stdout]);
    }
  });

  it("refcount_bits=1 cannot take a snapshot: qemu-img's error; qimg changes nothing", async () => {
    const f = qcow2(["-o", "refcount_bits=1"]);
    const { m } = await twins(f, ["-c", "s"]);
    // (qemu-img itself leaks the snapshot's L1 cluster here; qimg checks before writing.)
    expect(sameBytes(m, f)).toBe(true);
  });

  it("a locked image: the write lock error as for every qimg command; -U lists", async () => {
    const f = qcow2();
    ok(qemuImg(["snapshot", "-c", "s", f]), "snapshot -c");
    const before = readFileSync(f);
    await holdWithQemuIo(f);
    const c = await qimg(["snapshot", "-c", "x", f]);
    expect(c.code).toBe(1);
    expect(c.stderr).toMatch(/Failed to get "write" lock/);
    const l = await qimg(["snapshot", "-l", f]);
    expect(l.code).toBe(1);
    expect(l.stderr).toMatch(/Failed to get shared "write" lock/);
    const u = await qimg(["snapshot", "-U", "-l", f]);
    expect(u.code).toBe(0);
    expect(u.stdout).toMatch(/^Snapshot list:\n/);
    releaseQemuIo();
    expect(Buffer.compare(readFileSync(f), before)).toBe(0);
  });
});
