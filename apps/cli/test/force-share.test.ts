/**
 * `-U` (force share) against qemu-img and qemu-io. While qemu-io holds an image open for
 * writing, every reading command refuses it without -U (QEMU's writer does not share write:
 * "Failed to get shared "write" lock") and works with -U, in both tools, with the same exit
 * codes; -U with a read-write open is refused by both. Nothing is created or changed by a
 * refused command.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, qemuIo, holdWithQemuIo, releaseQemuIo } from "./qemu.js";

const haveProcLocks = existsSync("/proc/locks");
if (!hasQemu) console.log("skipping -U tests: qemu-img is not on PATH");
if (!haveProcLocks) console.log("skipping -U tests: no /proc/locks (not Linux)");

const tmp = mkdtempSync(join(tmpdir(), "qimg-force-share-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

afterEach(releaseQemuIo);

const SHARED_WRITE = /Failed to get shared "write" lock/;
const RO_ONLY = /force-share=on can only be used with read-only images/;

describe.skipIf(!hasQemu || !haveProcLocks)("-U while qemu-io writes the image", () => {
  // Each command with and without -U (inserted after the command name); OUT is a fresh name.
  const commands: readonly (readonly string[])[] = [
    ["info", "IMG"],
    ["info", "--output=json", "--backing-chain", "IMG"],
    ["map", "--output=json", "IMG"],
    ["check", "IMG"],
    ["compare", "IMG", "BASE"],
    ["convert", "-O", "raw", "IMG", "OUT"],
    ["convert", "-O", "qcow2", "IMG", "OUT"],
    ["dd", "if=IMG", "of=OUT", "bs=512", "count=7"],
    ["bench", "-c", "3", "IMG"],
  ];

  it("every reading command: refused without -U, works with it, as qemu-img", async () => {
    expect(qemuImg(["create", "-q", "-f", "raw", "base.raw", "1000448"], tmp).code).toBe(0);
    expect(qemuIo(["-f", "raw", "-c", "write -P 0x5a 0 77777", "base.raw"], tmp).code).toBe(0);
    expect(
      qemuImg(
        ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "held.qcow2", "1000448"],
        tmp,
      ).code,
    ).toBe(0);
    expect(qemuIo(["-f", "qcow2", "-c", "write -P 0x11 4096 70001", "held.qcow2"], tmp).code).toBe(
      0,
    );
    const before = readFileSync(join(tmp, "held.qcow2"));
    await holdWithQemuIo(join(tmp, "held.qcow2"));
    let n = 0;
    for (const args of commands) {
      for (const share of [false, true]) {
        const idx = n++;
        const argv = (who: string): string[] => {
          const out = args.map((a) =>
            a
              .replace(/IMG$/, "held.qcow2")
              .replace(/BASE$/, "base.raw")
              .replace(/OUT$/, `out-${who}-${idx}`),
          );
          if (share) out.splice(1, 0, "-U");
          return out;
        };
        const what = argv("x").join(" ");
        const theirs = qemuImg(argv("q"), tmp);
        const ours = await qimg(argv("o"), tmp);
        expect(ours.code, `${what}: qimg ${ours.stderr} / qemu-img ${theirs.stderr}`).toBe(
          theirs.code,
        );
        if (share) {
          // (compare exits 1: the images differ.)
          expect(theirs.code, `${what}: ${theirs.stderr}`).toBe(args[0] === "compare" ? 1 : 0);
          if (!["convert", "dd"].includes(args[0]!)) expect(ours.stdout, what).not.toBe("");
        } else {
          expect(theirs.stderr, what).toMatch(SHARED_WRITE);
          expect(ours.stderr, what).toMatch(SHARED_WRITE);
          expect(ours.stderr.split("\n"), what).toHaveLength(2); // one line
          // A refused convert or dd creates nothing.
          expect(existsSync(join(tmp, `out-o-${idx}`)), what).toBe(false);
        }
        if (share && args[0] === "map") expect(ours.stdout, what).toBe(theirs.stdout);
        if (share && (args[0] === "convert" || args[0] === "dd")) {
          const cmp = qemuImg(["compare", `out-q-${idx}`, `out-o-${idx}`], tmp);
          expect(cmp.code, `${what}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
        }
      }
    }
    // create -b only reads the backing file's size: both share every lock for it.
    for (const who of ["q", "o"]) {
      const args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "held.qcow2",
        "-F",
        "qcow2",
        `new-${who}.qcow2`,
      ];
      const r = who === "q" ? qemuImg(args, tmp) : await qimg(args, tmp);
      expect(r.code, `${who}: ${r.stderr}`).toBe(0);
    }
    // -U with a read-write open: both refuse (and change nothing).
    for (const args of [
      ["check", "-U", "-r", "all", "held.qcow2"],
      ["bench", "-U", "-w", "-c", "1", "held.qcow2"],
    ]) {
      const theirs = qemuImg(args, tmp);
      const ours = await qimg(args, tmp);
      expect(theirs.code).toBe(1);
      expect(theirs.stderr).toMatch(RO_ONLY);
      expect(ours.code, ours.stderr).toBe(1);
      expect(ours.stderr).toMatch(RO_ONLY);
    }
    expect(Buffer.compare(readFileSync(join(tmp, "held.qcow2")), before)).toBe(0);
  }, 60_000);

  it("io: -r needed without -U refused; -r -U reads, as qemu-io", async () => {
    expect(qemuImg(["create", "-q", "-f", "qcow2", "io.qcow2", "1000448"], tmp).code).toBe(0);
    expect(qemuIo(["-f", "qcow2", "-c", "write -P 0x22 1000 3000", "io.qcow2"], tmp).code).toBe(0);
    await holdWithQemuIo(join(tmp, "io.qcow2"));
    const cases: readonly (readonly string[])[] = [
      ["-r", "-c", "read -P 0x22 1000 3000", "io.qcow2"],
      ["-r", "-U", "-c", "read -P 0x22 1000 3000", "io.qcow2"],
      ["-U", "-c", "read -P 0x22 1000 3000", "io.qcow2"],
    ];
    for (const args of cases) {
      const theirs = qemuIo(["-f", "qcow2", ...args], tmp);
      const ours = await qimg(["io", "-f", "qcow2", ...args], tmp);
      const what = args.join(" ");
      expect(ours.code, `${what}: qimg ${ours.stderr} / qemu-io ${theirs.stderr}`).toBe(
        theirs.code,
      );
      expect(ours.stdout.split("\n")[0], what).toBe(theirs.stdout.split("\n")[0]);
      if (!args.includes("-U")) expect(ours.stderr).toMatch(SHARED_WRITE);
      else if (!args.includes("-r")) expect(ours.stderr).toMatch(RO_ONLY);
    }
  }, 30_000);
});
