/**
 * `qimg io` caches like qemu-io: its default cache mode is writethrough, so a write that
 * completed survives `abort` or a kill. The scenarios of QEMU's iotest 039 (lazy refcounts),
 * run through qimg io and through qemu-io on twin images: same dirty bit, same data, and the
 * same `qemu-img check` verdict (exit code, corruption and leak counts).
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { constants, tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { CLI_DIR, qimg, qimgProcess } from "./helpers.js";
import { hasQemu, qemuImg, qemuInfo, qemuIo, type Run } from "./qemu.js";

if (!hasQemu) console.log("skipping qimg io cache tests: qemu-img/qemu-io are not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-iocache-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

let n = 0;
/** Two identical new images (qimg's, QEMU's), 128 MiB as in iotest 039. */
function twins(opts: string, fmt = "qcow2", size = "128M"): [string, string] {
  n++;
  const pair = [join(tmp, `${n}-qimg.${fmt}`), join(tmp, `${n}-qemu.${fmt}`)] as [string, string];
  for (const f of pair) {
    const r = qemuImg(["create", "-q", "-f", fmt, ...(opts ? ["-o", opts] : []), f, size]);
    if (r.code !== 0) throw new Error(r.stderr);
  }
  return pair;
}

interface Verdict {
  readonly exit: number;
  readonly corruptions: number;
  readonly leaks: number;
  readonly dirty: boolean;
}

function verdict(file: string): Verdict {
  const r = qemuImg(["check", "--output=json", file]);
  const j = JSON.parse(r.stdout) as Record<string, number>;
  return {
    exit: r.code,
    corruptions: j.corruptions ?? 0,
    leaks: j.leaks ?? 0,
    dirty: qemuInfo(file)["dirty-flag"] === true,
  };
}

const TSX = pathToFileURL(createRequire(join(CLI_DIR, "package.json")).resolve("tsx")).href;

/** Run a process; a death by signal N is exit status 128 + N, as a shell reports it. */
function exec(cmd: string, args: readonly string[]): Run {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  const code = r.signal !== null ? 128 + constants.signals[r.signal] : (r.status ?? -1);
  return { code, stdout: r.stdout, stderr: r.stderr };
}

/** Run the same -c commands through qimg io (as a process, from source) and qemu-io. */
function both(cmds: readonly string[], ours: string, theirs: string, extra: string[] = []): Run[] {
  const args = cmds.flatMap((c) => ["-c", c]);
  const main = join(CLI_DIR, "src", "main.ts");
  return [
    exec(process.execPath, [
      "--conditions=@qimg/source",
      "--import",
      TSX,
      main,
      "io",
      ...extra,
      ...args,
      ours,
    ]),
    exec("qemu-io", [...extra, ...args, theirs]),
  ];
}

function readsBack(file: string, cmd: string): void {
  const r = qemuIo(["-r", "-c", cmd, file]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
  expect(r.stdout, file).not.toMatch(/fail/i);
}

describe.skipIf(!hasQemu)("qimg io cache modes (iotest 039 scenarios)", () => {
  it("image is clean on shutdown", async () => {
    const [ours, theirs] = twins("compat=1.1,lazy_refcounts=on");
    const r = await qimg(["io", "-c", "write -P 0x5a 0 512", ours]);
    expect(r.code).toBe(0);
    expect(qemuIo(["-c", "write -P 0x5a 0 512", theirs]).code).toBe(0);
    expect(verdict(ours)).toEqual(verdict(theirs));
    expect(verdict(ours)).toEqual({ exit: 0, corruptions: 0, leaks: 0, dirty: false });
  });

  for (const crash of ["abort", "sigraise 9"]) {
    it(`write then ${crash} (default cache): data kept, refcounts stale, dirty bit set`, () => {
      const [ours, theirs] = twins("compat=1.1,lazy_refcounts=on");
      const [a, b] = both(["write -P 0x5a 0 512", crash], ours, theirs);
      expect(a!.code).toBe(b!.code);
      const v = verdict(ours);
      expect(v).toEqual(verdict(theirs));
      expect(v.dirty).toBe(true);
      expect(v.exit).toBe(2);
      expect(v.corruptions).toBeGreaterThan(0);
      readsBack(ours, "read -P 0x5a 0 512");

      // Read-only access still works and keeps the dirty bit.
      const ro = qimgProcess(["io", "-r", "-c", "read -P 0x5a 0 512", ours]);
      expect(ro.code, ro.stdout + ro.stderr).toBe(0);
      expect(verdict(ours).dirty).toBe(true);

      // Opening the dirty image read-write repairs it (qimg io and qemu-io alike).
      const [c, d] = both(["write 0 512"], ours, theirs);
      expect(c!.code, c!.stdout + c!.stderr).toBe(0);
      expect(d!.code).toBe(0);
      expect(verdict(ours)).toEqual(verdict(theirs));
      expect(verdict(ours)).toEqual({ exit: 0, corruptions: 0, leaks: 0, dirty: false });
      readsBack(ours, "read -P 0xcd 0 512");
    });
  }

  it("repairing the crash image (qemu-img check -r all) keeps the data", () => {
    const [ours, theirs] = twins("compat=1.1,lazy_refcounts=on");
    both(["write -P 0x5a 0 512", "sigraise 9"], ours, theirs);
    const rOurs = qemuImg(["check", "-r", "all", ours]);
    const rTheirs = qemuImg(["check", "-r", "all", theirs]);
    expect(rOurs.code).toBe(rTheirs.code);
    expect(rOurs.stdout.replace(/Image end offset: \d+\n/, "")).toBe(
      rTheirs.stdout.replace(/Image end offset: \d+\n/, ""),
    );
    expect(verdict(ours)).toEqual({ exit: 0, corruptions: 0, leaks: 0, dirty: false });
    readsBack(ours, "read -P 0x5a 0 512");
  });

  it("lazy_refcounts=off: a kill leaves a clean image", () => {
    const [ours, theirs] = twins("compat=1.1,lazy_refcounts=off");
    both(["write -P 0x5a 0 512", "sigraise 9"], ours, theirs);
    expect(verdict(ours)).toEqual(verdict(theirs));
    expect(verdict(ours)).toEqual({ exit: 0, corruptions: 0, leaks: 0, dirty: false });
    readsBack(ours, "read -P 0x5a 0 512");
  });

  it("several writes and allocations before abort, unaligned sizes", () => {
    const [ours, theirs] = twins("compat=1.1,lazy_refcounts=on", "qcow2", "1000000000");
    const cmds = [
      "write -P 1 0 1000",
      "write -P 2 600M 70000",
      "write -P 3 123456 4096",
      "write -z 900M 65536",
      "abort",
    ];
    const [a, b] = both(cmds, ours, theirs);
    expect(a!.code).toBe(b!.code);
    expect(verdict(ours)).toEqual(verdict(theirs));
    for (const r of ["read -P 1 0 1000", "read -P 2 600M 70000", "read -P 3 123456 4096"]) {
      readsBack(ours, r);
    }
  });

  it("QED and raw: a write before abort is kept (writethrough)", () => {
    const [ours, theirs] = twins("", "qed", "100000000");
    both(["write -P 0x5a 12345 70000", "abort"], ours, theirs);
    readsBack(ours, "read -P 0x5a 12345 70000");
    expect(qemuImg(["check", ours]).code).toBe(qemuImg(["check", theirs]).code);
    const [r1, r2] = twins("", "raw", "1000000");
    both(["write -P 0x5a 1000 3000", "abort"], r1, r2);
    expect(qemuImg(["compare", "-f", "raw", "-F", "raw", r1, r2]).stdout).toBe(
      "Images are identical.\n",
    );
  });

  it("-t / --cache / -n take qemu-io's modes; writeback keeps metadata until a flush", async () => {
    for (const mode of ["none", "writeback", "writethrough", "directsync", "unsafe"]) {
      const [ours] = twins("compat=1.1,lazy_refcounts=on");
      const r = await qimg(["io", "-t", mode, "-c", "write -P 9 0 64k", ours]);
      expect(r.code, mode).toBe(0);
      expect(verdict(ours), mode).toEqual({ exit: 0, corruptions: 0, leaks: 0, dirty: false });
      readsBack(ours, "read -P 9 0 64k");
    }
    const [n1] = twins("");
    expect((await qimg(["io", "-n", "-c", "write 0 512", n1])).code).toBe(0);
    const bad = await qimg(["io", "--cache", "bogus", "-c", "read 0 512", n1]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe("qimg: Invalid cache option: bogus\n");
    expect(qemuIo(["-t", "bogus", "-c", "read 0 512", n1]).code).toBe(1);
    // Writeback: the L2 update is still in qimg's cache at the abort, so the write is lost
    // (qemu-io -t writeback loses it too); an explicit flush makes it durable.
    const [w1, w2] = twins("compat=1.1,lazy_refcounts=off");
    both(["write -P 0x5a 0 512", "abort"], w1, w2, ["-t", "writeback"]);
    expect(qemuIo(["-r", "-c", "read -P 0x5a 0 512", w1]).stdout).toMatch(/Pattern verification/);
    expect(qemuIo(["-r", "-c", "read -P 0x5a 0 512", w2]).stdout).toMatch(/Pattern verification/);
    const [f1] = twins("compat=1.1,lazy_refcounts=off");
    qimgProcess([
      "io",
      "-t",
      "writeback",
      "-c",
      "write -P 0x5a 0 512",
      "-c",
      "flush",
      "-c",
      "abort",
      f1,
    ]);
    readsBack(f1, "read -P 0x5a 0 512");
  });
});
