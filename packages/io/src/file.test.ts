import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorCode, IoError } from "@qimg/structs";
import { FileBackend } from "./file.js";
import { backendContract, rejectsWith } from "./contract.testkit.js";

let dir: string;
let counter = 0;
const tmp = (): string => path.join(dir, `f${++counter}.img`);

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-io-"));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

backendContract("FileBackend", {
  empty: () => FileBackend.open(tmp(), { create: true, truncate: true }),
  readOnlyWith: (bytes) => {
    const p = tmp();
    fs.writeFileSync(p, bytes);
    return FileBackend.open(p, { readOnly: true });
  },
});

describe("FileBackend", () => {
  it("writes land in the file; kind is file; name is the path", async () => {
    const p = tmp();
    const b = await FileBackend.open(p, { create: true });
    expect(b.kind).toBe("file");
    expect(b.name).toBe(p);
    expect(b.path).toBe(p);
    await b.write(3, new Uint8Array([1, 2, 3]));
    await b.flush();
    await b.close();
    expect([...fs.readFileSync(p)]).toEqual([0, 0, 0, 1, 2, 3]);
  });

  it("opens an existing file with its size; truncate option empties it", async () => {
    const p = tmp();
    fs.writeFileSync(p, new Uint8Array(12345));
    const b = await FileBackend.open(p);
    expect(await b.size()).toBe(12345);
    await b.close();
    const t = await FileBackend.open(p, { truncate: true });
    expect(await t.size()).toBe(0);
    await t.close();
    expect(fs.statSync(p).size).toBe(0);
  });

  it("cached size follows writes and truncate and matches fstat", async () => {
    const p = tmp();
    const b = await FileBackend.open(p, { create: true });
    await b.write(1_000_000, new Uint8Array(1));
    expect(await b.size()).toBe(1_000_001);
    expect(fs.statSync(p).size).toBe(1_000_001);
    await b.write(10, new Uint8Array(10));
    expect(await b.size()).toBe(1_000_001);
    await b.truncate(50);
    expect(await b.size()).toBe(50);
    expect(fs.statSync(p).size).toBe(50);
    await b.close();
  });

  it("a missing file is an IO error naming the path, with the system error as cause", async () => {
    const p = path.join(dir, "does-not-exist.img");
    const e = await rejectsWith(FileBackend.open(p), ErrorCode.IO);
    expect(e).toBeInstanceOf(IoError);
    expect(e.message).toContain(p);
    expect((e.cause as NodeJS.ErrnoException).code).toBe("ENOENT");
  });

  it("create makes a missing file", async () => {
    const p = path.join(dir, "new.img");
    const b = await FileBackend.open(p, { create: true });
    expect(await b.size()).toBe(0);
    await b.close();
    expect(fs.existsSync(p)).toBe(true);
  });

  it("refuses a directory with NOT_A_FILE naming the path (read-only and read-write)", async () => {
    for (const readOnly of [true, false]) {
      const e = await rejectsWith(FileBackend.open(dir, { readOnly }), ErrorCode.NOT_A_FILE);
      expect(e.message).toContain(dir);
      expect(e.message).toMatch(/directory/);
    }
  });

  it("refuses /dev/null: a character device is neither a regular file nor a block device", async (ctx) => {
    if (!fs.existsSync("/dev/null")) ctx.skip("no /dev/null on this platform");
    const e = await rejectsWith(
      FileBackend.open("/dev/null", { readOnly: true }),
      ErrorCode.NOT_A_FILE,
    );
    expect(e.message).toContain("/dev/null");
    expect(e.message).toMatch(/character device/);
  });

  it("refuses a FIFO without blocking on open", async (ctx) => {
    const p = path.join(dir, "fifo");
    const { spawnSync } = await import("node:child_process");
    const r = spawnSync("mkfifo", [p]);
    if (r.status !== 0) ctx.skip("mkfifo not available");
    const e = await rejectsWith(FileBackend.open(p, { readOnly: true }), ErrorCode.NOT_A_FILE);
    expect(e.message).toMatch(/FIFO/);
  });

  it("rejects readOnly together with create or truncate", async () => {
    await rejectsWith(
      FileBackend.open(tmp(), { readOnly: true, create: true }),
      ErrorCode.INVALID_ARGUMENT,
    );
    await rejectsWith(
      FileBackend.open(tmp(), { readOnly: true, truncate: true }),
      ErrorCode.INVALID_ARGUMENT,
    );
  });

  it("a permission error keeps its cause", async (ctx) => {
    if (process.getuid?.() === 0) ctx.skip("running as root: permissions are not enforced");
    const p = tmp();
    fs.writeFileSync(p, "x");
    fs.chmodSync(p, 0o000);
    const e = await rejectsWith(FileBackend.open(p), ErrorCode.IO);
    expect((e.cause as NodeJS.ErrnoException).code).toBe("EACCES");
  });

  it("close waits for an in-flight flush", async () => {
    const b = await FileBackend.open(tmp(), { create: true });
    await b.write(0, new Uint8Array(4096).fill(1));
    const f = b.flush();
    const c = b.close();
    await expect(f).resolves.toBeUndefined();
    await expect(c).resolves.toBeUndefined();
  });

  it("detects a block device when one is readable", async (ctx) => {
    const candidates = ["/dev/loop0", "/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/xvda"];
    let found: string | undefined;
    for (const c of candidates) {
      try {
        if (!fs.statSync(c).isBlockDevice()) continue;
        fs.closeSync(fs.openSync(c, "r"));
        found = c;
        break;
      } catch {
        // not present or not readable
      }
    }
    if (found === undefined) {
      ctx.skip(`no readable block device among ${candidates.join(", ")}`);
      return;
    }
    let b: FileBackend;
    try {
      b = await FileBackend.open(found, { readOnly: true });
    } catch (e) {
      // An unattached loop device opens but has no size; reading it is an ENXIO on some kernels.
      ctx.skip(`${found} could not be opened: ${(e as Error).message}`);
      return;
    }
    expect(b.kind).toBe("block-device");
    const size = await b.size();
    expect(size).toBeGreaterThanOrEqual(0);
    await rejectsWith(b.truncate(size + 512), ErrorCode.READ_ONLY);
    await b.close();
  });
});

describe("FaultBackend over FileBackend", () => {
  it("power loss keeps what was flushed to the file and drops the rest", async () => {
    const { FaultBackend } = await import("./fault.js");
    const p = tmp();
    fs.writeFileSync(p, new Uint8Array(1024).fill(7));
    const f = await FaultBackend.wrap(await FileBackend.open(p));
    expect(f.kind).toBe("file");
    await f.write(0, new Uint8Array(512).fill(1));
    await f.flush();
    await f.write(512, new Uint8Array(512).fill(2));
    const after = f.powerLoss();
    const bytes = after.snapshot();
    expect(bytes.subarray(0, 512).every((x) => x === 1)).toBe(true);
    expect(bytes.subarray(512).every((x) => x === 7)).toBe(true);
    await f.close();
    // the file itself holds every completed write (the page cache survived; only the model lost power)
    expect(fs.readFileSync(p)[600]).toBe(2);
  });
});
