import { spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { FileBackend } from "./file.js";
import {
  ImageLockedError,
  canPublishLocks,
  parseProcLocks,
  setProcLocksPathForTesting,
} from "./lock.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-lock-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let counter = 0;
function file(bytes = 4096): string {
  const p = path.join(dir, `f${++counter}.img`);
  fs.writeFileSync(
    p,
    new Uint8Array(bytes).map((_, i) => (i * 7 + counter) & 0xff),
  );
  return p;
}

/** qemu-io is the oracle for QEMU's locks; without it those tests skip (unless required). */
const haveQemuIo = spawnSync("qemu-io", ["--version"], { encoding: "utf8" }).status === 0;
if (!haveQemuIo && process.env.QIMG_REQUIRE_QEMU === "1") {
  throw new Error("qemu-io is not on PATH but QIMG_REQUIRE_QEMU=1 (install qemu-utils)");
}
if (!haveQemuIo) console.log("skipping QEMU lock interop tests: qemu-io is not on PATH");
const haveProcLocks = fs.existsSync("/proc/locks");
if (!haveProcLocks) console.log("skipping QEMU lock interop tests: no /proc/locks");

async function refused(p: Promise<unknown>, text: RegExp): Promise<ImageLockedError> {
  const e: unknown = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(ImageLockedError);
  expect((e as Error).message).toMatch(text);
  return e as ImageLockedError;
}

describe("in-process image locks (QEMU's default permissions)", () => {
  it("a second writer is refused; the file stays as it was, even when asked to truncate", async () => {
    const p = file();
    const before = fs.readFileSync(p);
    const w = await FileBackend.open(p);
    const e = await refused(
      FileBackend.open(p, { truncate: true }),
      /Failed to get "write" lock\. Is another process using the image \[.*\]\?/,
    );
    expect(e.holder).toBe("this process");
    expect(e.permission).toBe("write");
    expect(Buffer.compare(fs.readFileSync(p), before)).toBe(0);
    await w.close();
    const again = await FileBackend.open(p, { truncate: true });
    expect(await again.size()).toBe(0);
    await again.close();
  });

  it("a reader is refused while a writer has the file, and a writer while a reader has it", async () => {
    const p = file();
    const w = await FileBackend.open(p);
    const e = await refused(
      FileBackend.open(p, { readOnly: true }),
      /Failed to get shared "write" lock/,
    );
    expect(e.shared).toBe(true);
    await w.close();
    const r = await FileBackend.open(p, { readOnly: true });
    await refused(FileBackend.open(p), /Failed to get "write" lock/);
    await r.close();
    await (await FileBackend.open(p)).close();
  });

  it("readers share; forceShare readers coexist with a writer; lock: false skips the checks", async () => {
    const p = file();
    const r1 = await FileBackend.open(p, { readOnly: true });
    const r2 = await FileBackend.open(p, { readOnly: true });
    await r1.close();
    await refused(FileBackend.open(p), /"write" lock/);
    await r2.close();
    const w = await FileBackend.open(p);
    const shared = await FileBackend.open(p, { readOnly: true, forceShare: true });
    const buf = new Uint8Array(4);
    await shared.read(0, buf);
    await shared.close();
    const unlocked = await FileBackend.open(p, { lock: false });
    await unlocked.close();
    await w.close();
    await expect(FileBackend.open(p, { forceShare: true })).rejects.toThrow(/read-only/);
  });

  it("the same file through a hard link and a symbolic link is the same image", async () => {
    const p = file();
    const hard = `${p}.hard`;
    const soft = `${p}.soft`;
    fs.linkSync(p, hard);
    fs.symlinkSync(p, soft);
    const w = await FileBackend.open(hard);
    await refused(FileBackend.open(soft), /"write" lock/);
    await refused(FileBackend.open(p, { readOnly: true }), /shared "write" lock/);
    await w.close();
  });

  it("of two writers opening at the same time, exactly one gets the file", async () => {
    const p = file();
    const results = await Promise.allSettled([FileBackend.open(p), FileBackend.open(p)]);
    const ok = results.filter((r) => r.status === "fulfilled");
    expect(ok).toHaveLength(1);
    const failed = results.find((r) => r.status === "rejected");
    expect(failed?.reason).toBeInstanceOf(ImageLockedError);
    await (ok[0] as PromiseFulfilledResult<FileBackend>).value.close();
  });

  it("a failed open and a closed backend release their claim", async () => {
    const p = file();
    const w = await FileBackend.open(p);
    await refused(FileBackend.open(p), /"write" lock/);
    await w.close();
    await w.close(); // idempotent
    const r = await FileBackend.open(p, { readOnly: true });
    await r.close();
    const w2 = await FileBackend.open(p);
    await w2.close();
  });
});

describe("parseProcLocks", () => {
  // dev 0xfe00 (major 0xfe, minor 0) and inode 2148469, as /proc/locks prints them.
  const dev = 0xfe00n;
  const ino = 2148469n;
  const qemuWriter = [
    "1: OFDLCK ADVISORY  READ -1 fe:00:2148469 203 203",
    "2: OFDLCK ADVISORY  READ -1 fe:00:2148469 201 201",
    "3: OFDLCK ADVISORY  READ -1 fe:00:2148469 103 103",
    "4: OFDLCK ADVISORY  READ -1 fe:00:2148469 100 101",
  ].join("\n");

  it("reads QEMU's permission and shared-permission bytes", () => {
    expect(parseProcLocks(qemuWriter, dev, ino, 1)).toEqual({
      held: 0b1011,
      unshared: 0b1010,
    });
  });

  it("ignores other files, waiters, flock locks and this process's POSIX locks", () => {
    const text = [
      "1: OFDLCK ADVISORY  READ -1 fe:01:2148469 100 300",
      "2: OFDLCK ADVISORY  READ -1 fe:00:2148468 100 300",
      "3: -> OFDLCK ADVISORY  WRITE -1 fe:00:2148469 100 300",
      "4: FLOCK  ADVISORY  WRITE 77 fe:00:2148469 0 EOF",
      "5: POSIX  ADVISORY  WRITE 4242 fe:00:2148469 0 EOF",
    ].join("\n");
    expect(parseProcLocks(text, dev, ino, 4242)).toEqual({ held: 0, unshared: 0 });
    // Another process's POSIX lock over the whole file covers every byte.
    expect(parseProcLocks(text, dev, ino, 1)).toEqual({ held: 0b1111, unshared: 0b1111 });
  });

  it("decodes large device numbers as glibc encodes them", () => {
    // major 0x103, minor 0x12345: dev = (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)
    const big = 0x45n | (0x103n << 8n) | ((0x12345n & ~0xffn) << 12n);
    const text = "1: OFDLCK ADVISORY  READ -1 103:12345:99 200 200";
    expect(parseProcLocks(text, big, 99n, 1)).toEqual({ held: 0, unshared: 0b1 });
  });

  it("a listing that denies consistent read refuses readers", async () => {
    const p = file();
    const st = fs.statSync(p, { bigint: true });
    const major = ((st.dev >> 8n) & 0xfffn) | ((st.dev >> 32n) & ~0xfffn);
    const minor = (st.dev & 0xffn) | ((st.dev >> 12n) & ~0xffn);
    const listing = path.join(dir, "locks");
    fs.writeFileSync(
      listing,
      `1: OFDLCK ADVISORY  READ -1 ${major.toString(16)}:${minor.toString(16)}:${st.ino} 200 200\n`,
    );
    setProcLocksPathForTesting(listing);
    try {
      await refused(FileBackend.open(p, { readOnly: true }), /Failed to get "consistent read"/);
      await refused(FileBackend.open(p), /Failed to get "consistent read"/);
    } finally {
      setProcLocksPathForTesting(undefined);
    }
    await (await FileBackend.open(p, { readOnly: true })).close();
  });
});

describe.skipIf(!haveQemuIo || !haveProcLocks)("QEMU's locks (qemu-io holding the image)", () => {
  let child: ChildProcess | undefined;
  afterEach(() => {
    if (child?.exitCode === null) child.kill("SIGKILL");
    child = undefined;
  });

  /** A qcow2 image made by qemu-img (QEMU's format drivers do not share write). */
  function qcow2(): string {
    const p = path.join(dir, `q${++counter}.qcow2`);
    const r = spawnSync("qemu-img", ["create", "-q", "-f", "qcow2", p, "1000000"], {
      encoding: "utf8",
    });
    expect(r.status, r.stderr).toBe(0);
    return p;
  }

  /** Start qemu-io on `p` and wait until its locks show in /proc/locks. */
  async function hold(p: string, format: string, readOnly: boolean): Promise<ChildProcess> {
    const args = ["-f", format, ...(readOnly ? ["-r"] : []), "-c", "sleep 20000", p];
    const c = spawn("qemu-io", args, { stdio: ["ignore", "ignore", "pipe"] });
    child = c;
    const ino = fs.statSync(p).ino;
    for (let i = 0; i < 200; i++) {
      if (fs.readFileSync("/proc/locks", "latin1").includes(`:${ino} 100 `)) return c;
      if (c.exitCode !== null) throw new Error(`qemu-io exited with ${c.exitCode}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    throw new Error("qemu-io took no lock on the image within 5 s");
  }

  async function stop(c: ChildProcess): Promise<void> {
    const exited = new Promise((r) => c.once("exit", r));
    c.kill("SIGTERM");
    await exited;
  }

  it("a read-write qemu-io: qimg cannot write (the file stays as it was); afterwards it can", async () => {
    const p = qcow2();
    const before = fs.readFileSync(p);
    const c = await hold(p, "qcow2", false);
    // The oracle: a second qemu-io gets the same refusal.
    const q = spawnSync("qemu-io", ["-f", "qcow2", "-c", "write 0 512", p], { encoding: "utf8" });
    expect(q.stderr).toMatch(/Failed to get "write" lock/);
    const e = await refused(
      FileBackend.open(p, { truncate: true }),
      /Failed to get "write" lock\. Is another process using the image/,
    );
    expect(e.holder).toBe("another process");
    expect(Buffer.compare(fs.readFileSync(p), before)).toBe(0);
    // Reading needs forceShare (qemu-img's -U) while QEMU writes, as in qemu-img.
    await refused(FileBackend.open(p, { readOnly: true }), /Failed to get shared "write" lock/);
    const r = await FileBackend.open(p, { readOnly: true, forceShare: true });
    await r.close();
    await stop(c);
    const w = await FileBackend.open(p);
    await w.write(1 << 20, new Uint8Array([1, 2, 3]));
    await w.close();
    expect([...fs.readFileSync(p).subarray(1 << 20)]).toEqual([1, 2, 3]);
  });

  it("a read-only qemu-io denies shared write: qimg cannot write, but can read", async () => {
    const p = qcow2();
    const before = fs.readFileSync(p);
    const c = await hold(p, "qcow2", true);
    const q = spawnSync("qemu-io", ["-f", "qcow2", "-c", "write 0 512", p], { encoding: "utf8" });
    expect(q.stderr).toMatch(/Failed to get "write" lock/);
    await refused(FileBackend.open(p), /Failed to get "write" lock/);
    expect(Buffer.compare(fs.readFileSync(p), before)).toBe(0);
    const r = await FileBackend.open(p, { readOnly: true });
    const buf = new Uint8Array(10);
    await r.read(0, buf);
    await r.close();
    await stop(c);
    await (await FileBackend.open(p)).close();
  });

  it("raw images: a QEMU writer excludes qimg's writer; a QEMU reader shares writing", async () => {
    // QEMU's raw driver shares write with other users; qimg, which cannot show QEMU its own
    // writes, stays out while QEMU holds the write permission.
    const p = file(5000);
    let c = await hold(p, "raw", false);
    await refused(FileBackend.open(p), /Failed to get shared "write" lock/);
    await stop(c);
    c = await hold(p, "raw", true);
    await (await FileBackend.open(p)).close();
    await stop(c);
  });
});

const havePerl = spawnSync("perl", ["-e", "1"]).status === 0;
if (!havePerl) console.log("skipping lock publishing tests: perl is not on PATH");

describe.skipIf(!haveQemuIo || !haveProcLocks || !havePerl || !canPublishLocks())(
  "publishLock: QEMU sees qimg's locks",
  () => {
    function qcow2(): string {
      const p = path.join(dir, `p${++counter}.qcow2`);
      const r = spawnSync("qemu-img", ["create", "-q", "-f", "qcow2", p, "1000000"], {
        encoding: "utf8",
      });
      expect(r.status, r.stderr).toBe(0);
      return p;
    }
    const qemuWrite = (p: string): ReturnType<typeof spawnSync> =>
      spawnSync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x33 0 4096", p], {
        encoding: "utf8",
      });

    it("qemu-io cannot write an image qimg has open for writing; afterwards it can", async () => {
      const p = qcow2();
      const w = await FileBackend.open(p, { publishLock: true });
      expect(w.locksPublished).toBe(true);
      const before = fs.readFileSync(p);
      const q = qemuWrite(p);
      expect(q.status).not.toBe(0);
      expect(String(q.stderr)).toMatch(
        /Failed to get "write" lock\nIs another process using the image/,
      );
      // qemu-img info (read-only) is refused too: qimg holds write and does not share it.
      const info = spawnSync("qemu-img", ["info", p], { encoding: "utf8" });
      expect(info.stderr).toMatch(/Failed to get shared "write" lock/);
      expect(Buffer.compare(fs.readFileSync(p), before)).toBe(0);
      // This process's own publisher is not taken for a foreign user.
      await refused(FileBackend.open(p), /"write" lock/); // (the in-process check)
      await w.close();
      expect(qemuWrite(p).status).toBe(0);
    });

    it("a qimg reader keeps QEMU from writing but lets it read", async () => {
      const p = qcow2();
      const r = await FileBackend.open(p, { readOnly: true, publishLock: true });
      expect(r.locksPublished).toBe(true);
      expect(String(qemuWrite(p).stderr)).toMatch(/Failed to get "write" lock/);
      const read = spawnSync("qemu-io", ["-f", "qcow2", "-r", "-c", "read 0 512", p], {
        encoding: "utf8",
      });
      expect(read.status, read.stderr).toBe(0);
      await r.close();
      expect(qemuWrite(p).status).toBe(0);
    });

    it("another process (qemu-img or qimg) sees the locks; a crash releases them", async () => {
      const p = qcow2();
      // A child Node process holds the image with published locks, then dies abruptly.
      const script = [
        `const { FileBackend } = await import(${JSON.stringify(new URL("./file.ts", import.meta.url).href)});`,
        `const b = await FileBackend.open(${JSON.stringify(p)}, { publishLock: true });`,
        `process.stdout.write(b.locksPublished ? "held\\n" : "not\\n");`,
        "setInterval(() => {}, 1000);",
      ].join("\n");
      const tsx = import.meta.resolve("tsx");
      const holder = spawn(
        process.execPath,
        ["--conditions=@qimg/source", "--import", tsx, "--input-type=module", "-e", script],
        {
          stdio: ["ignore", "pipe", "inherit"],
        },
      );
      try {
        const first = await new Promise<string>((resolve, reject) => {
          holder.stdout.setEncoding("utf8");
          holder.stdout.once("data", (d: string) => resolve(d.trim()));
          holder.once("exit", (code) => reject(new Error(`holder exited with ${code}`)));
        });
        expect(first).toBe("held");
        expect(String(qemuWrite(p).stderr)).toMatch(/Failed to get "write" lock/);
        const e = await refused(FileBackend.open(p), /Failed to get "write" lock/);
        expect(e.holder).toBe("another process");
      } finally {
        const exited = new Promise((r) => holder.once("exit", r));
        holder.kill("SIGKILL");
        await exited;
      }
      // The helper notices its parent is gone (its input closes) and lets go.
      for (let i = 0; i < 100 && qemuWrite(p).status !== 0; i++) {
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(qemuWrite(p).status).toBe(0);
      await (await FileBackend.open(p)).close();
    });
  },
);
