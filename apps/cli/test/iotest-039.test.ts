/**
 * QEMU's iotest 039 (qcow2 dirty bit and lazy refcounts), ported: a write, then a crash
 * (`sigraise 9`: the process dies with the write done and the refcounts not), then what each
 * tool says about and does with the crash image. apps/cli/test/io-cache.test.ts checks the
 * image qimg io leaves behind with qemu-img; here qimg's own commands are held against
 * QEMU's on byte-identical twins of one crash image, kept in two directories under the same
 * name so that every line can be compared as it is:
 *
 * - `check` (text and JSON): the same ERROR lines, counts and exit code 2;
 * - `io -r` reads the data and leaves the image (and its dirty bit) untouched;
 * - `check -r all` and `check -r leaks`: the same repair lines, exit codes and result;
 * - a read-write `io` open repairs the image first, printing the same lines;
 * - with lazy refcounts off (on the image, or at open with `-o lazy-refcounts=off`) a crash
 *   leaves a clean image; `-o lazy-refcounts=on` on a plain image leaves a dirty one;
 * - the image qimg io leaves after a crash gets the same check report as qemu-io's.
 *
 * Not ported: "committing to a backing file" (qimg has no commit command) and `reopen`
 * (qimg io has no reopen; the open option `-o lazy-refcounts=` stands in for it).
 * Seeded: besides 039's own `write -P 0x5a 0 512`, a few writes at unaligned offsets and
 * lengths (QIMG_SEED replays a run; the seed is in every assertion message).
 */
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { constants, tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { CLI_DIR } from "./helpers.js";
import { hasQemu, prng, qemuInfo, type Run } from "./qemu.js";

if (!hasQemu) console.log("skipping iotest 039 tests: qemu-img/qemu-io are not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-039-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const THEIRS = join(tmp, "theirs");
const OURS = join(tmp, "ours");
mkdirSync(THEIRS);
mkdirSync(OURS);

const seed = Number(process.env.QIMG_SEED ?? Date.now() % 1_000_000);
const rnd = prng(seed);
const pick = (n: number): number => Math.floor(rnd() * n);

const TSX = pathToFileURL(createRequire(join(CLI_DIR, "package.json")).resolve("tsx")).href;
const MAIN = join(CLI_DIR, "src", "main.ts");

/** Run a process in `cwd`; a death by signal N is exit status 128 + N, as a shell says. */
function exec(cmd: string, args: readonly string[], cwd: string): Run {
  const r = spawnSync(cmd, args, { cwd, encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  const code = r.signal !== null ? 128 + constants.signals[r.signal] : (r.status ?? -1);
  return { code, stdout: r.stdout, stderr: r.stderr };
}

const qemu = (tool: "qemu-img" | "qemu-io", args: readonly string[]): Run =>
  exec(tool, args, THEIRS);
/** qimg as a process (a crash must really end it). */
const ours = (args: readonly string[]): Run =>
  exec(process.execPath, ["--conditions=@qimg/source", "--import", TSX, MAIN, ...args], OURS);

/** qemu-io's name and its report timings set aside. */
function normalize(text: string): string {
  return text.replace(/^qemu-(io|img): /gm, "qimg: ").replace(/^(.*, \d+ ops; ).*$/gm, "$1TIME");
}

/** The same command (qemu-img/qemu-io on THEIRS, qimg on OURS): the same output and exit. */
function same(tool: "qemu-img" | "qemu-io", args: readonly string[], what: string): Run {
  const q = qemu(tool, args);
  const o = ours([
    tool === "qemu-img" ? (args[0] ?? "") : "io",
    ...args.slice(tool === "qemu-img" ? 1 : 0),
  ]);
  const label = `seed ${seed}: ${what}: ${tool} ${args.join(" ")}\nqimg (${o.code}): ${o.stdout}${o.stderr}`;
  expect(normalize(o.stdout), label).toBe(normalize(q.stdout));
  expect(normalize(o.stderr), label).toBe(normalize(q.stderr));
  expect(o.code, label).toBe(q.code);
  return q;
}

function create(dir: string, opts: string): void {
  const r = exec("qemu-img", ["create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "128M"], dir);
  expect(r.code, r.stderr).toBe(0);
}

/** Writes at unaligned offsets and lengths (039's own write comes first). */
function writes(): string[] {
  const cmds = ["write -P 0x5a 0 512"];
  for (let i = 0; i < 3; i++) {
    cmds.push(`write -P ${1 + pick(254)} ${1 + pick(100 << 20)} ${1 + pick(200_000)}`);
  }
  return cmds;
}

/** A crash image made by qemu-io, copied byte for byte into both directories. */
function qemuCrash(opts: string, cmds: readonly string[], ioArgs: readonly string[] = []): void {
  create(THEIRS, opts);
  const r = qemu("qemu-io", [
    ...ioArgs,
    ...cmds.flatMap((c) => ["-c", c]),
    "-c",
    "sigraise 9",
    "t.qcow2",
  ]);
  expect(r.code, r.stdout + r.stderr).toBe(128 + 9);
  copyFileSync(join(THEIRS, "t.qcow2"), join(OURS, "t.qcow2"));
}

const dirty = (dir: string): boolean => qemuInfo(join(dir, "t.qcow2"))["dirty-flag"] === true;
const bytes = (dir: string): Buffer => readFileSync(join(dir, "t.qcow2"));

function clean(dir: string, what: string): void {
  const c = exec("qemu-img", ["check", "t.qcow2"], dir);
  expect(c.code, `seed ${seed}: ${what}: ${c.stdout}${c.stderr}`).toBe(0);
  expect(dirty(dir), what).toBe(false);
}

describe.skipIf(!hasQemu)("iotest 039: dirty bit and lazy refcounts", () => {
  for (const variant of ["039's write", "seeded writes"]) {
    const cmds = (): string[] => (variant === "039's write" ? ["write -P 0x5a 0 512"] : writes());

    it(`a crash image (${variant}): check, read-only io, check -r all`, () => {
      const script = cmds();
      qemuCrash("compat=1.1,lazy_refcounts=on", script);
      expect(dirty(OURS)).toBe(true);
      const what = `crash after ${script.join("; ")}`;
      const c = same("qemu-img", ["check", "t.qcow2"], what);
      expect(c.code).toBe(2);
      same("qemu-img", ["check", "--output=json", "t.qcow2"], what);

      // Read-only access still works, repairs nothing, and keeps the dirty bit.
      const before = bytes(OURS);
      const reads = script.map((w) => w.replace(/^write/, "read"));
      same("qemu-io", ["-r", ...reads.flatMap((r) => ["-c", r]), "t.qcow2"], what);
      expect(bytes(OURS).equals(before), what).toBe(true);
      expect(dirty(OURS)).toBe(true);

      // Repairing succeeds, says what qemu-img says, and keeps the data.
      same("qemu-img", ["check", "-r", "all", "t.qcow2"], what);
      clean(OURS, what);
      same("qemu-io", ["-r", ...reads.flatMap((r) => ["-c", r]), "t.qcow2"], `${what}, repaired`);
      const cmp = exec(
        "qemu-img",
        ["compare", join(THEIRS, "t.qcow2"), join(OURS, "t.qcow2")],
        tmp,
      );
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    });

    it(`a crash image (${variant}): check -r leaks`, () => {
      const script = cmds();
      qemuCrash("compat=1.1,lazy_refcounts=on", script);
      const what = `crash after ${script.join("; ")}`;
      same("qemu-img", ["check", "-r", "leaks", "t.qcow2"], what);
      same("qemu-img", ["check", "t.qcow2"], `${what}, after -r leaks`);
    });

    it(`a crash image (${variant}): a read-write open repairs it`, () => {
      const script = cmds();
      qemuCrash("compat=1.1,lazy_refcounts=on", script);
      const what = `crash after ${script.join("; ")}`;
      same("qemu-io", ["-c", "write 0 512", "t.qcow2"], what);
      clean(OURS, what);
      same("qemu-io", ["-r", "-c", "read -P 0xcd 0 512", "t.qcow2"], what);
    });
  }

  it("lazy_refcounts=off: a crash leaves a clean image", () => {
    qemuCrash("compat=1.1,lazy_refcounts=off", writes());
    expect(dirty(OURS)).toBe(false);
    same("qemu-img", ["check", "t.qcow2"], "lazy_refcounts=off crash");
  });

  it("lazy refcounts switched at open: on makes a crash image dirty, off keeps it clean", () => {
    // qemu-io's reopen -o lazy-refcounts=... in 039; here the option is given at open.
    for (const [created, at, isDirty] of [
      ["off", "on", true],
      ["on", "off", false],
    ] as const) {
      const script = writes();
      create(THEIRS, `compat=1.1,lazy_refcounts=${created}`);
      create(OURS, `compat=1.1,lazy_refcounts=${created}`);
      const args = [...script.flatMap((c) => ["-c", c]), "-c", "sigraise 9"];
      const q = qemu("qemu-io", [
        ...args,
        "--image-opts",
        `driver=qcow2,file.filename=t.qcow2,lazy-refcounts=${at}`,
      ]);
      const o = ours(["io", "-o", `lazy-refcounts=${at}`, ...args, "t.qcow2"]);
      const what = `created lazy_refcounts=${created}, opened ${at}: ${script.join("; ")}`;
      expect(o.code, what).toBe(q.code);
      expect(dirty(OURS), what).toBe(isDirty);
      expect(dirty(THEIRS), what).toBe(isDirty);
      const cq = exec("qemu-img", ["check", "t.qcow2"], THEIRS);
      const co = exec("qemu-img", ["check", "t.qcow2"], OURS);
      expect(co.code, what).toBe(cq.code);
      expect(co.code, what).toBe(isDirty ? 2 : 0);
    }
  });

  it("the crash image qimg io leaves gets qemu-io's check report", () => {
    for (const crash of ["sigraise 9", "abort"]) {
      const script = writes();
      create(THEIRS, "compat=1.1,lazy_refcounts=on");
      create(OURS, "compat=1.1,lazy_refcounts=on");
      const args = [...script.flatMap((c) => ["-c", c]), "-c", crash, "t.qcow2"];
      const q = qemu("qemu-io", args);
      const o = ours(["io", ...args]);
      const what = `${script.join("; ")}; ${crash}`;
      expect(o.code, what).toBe(q.code);
      const cq = exec("qemu-img", ["check", "t.qcow2"], THEIRS);
      const co = exec("qemu-img", ["check", "t.qcow2"], OURS);
      expect(co.stdout + co.stderr, `seed ${seed}: ${what}`).toBe(cq.stdout + cq.stderr);
      expect(co.code, what).toBe(cq.code);
    }
  });
});
