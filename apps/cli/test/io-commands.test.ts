/**
 * qemu-io parity of `qimg io`'s command language: each script runs through the real qemu-io and
 * through qimg io on twin copies of one image (qcow2, QED, raw; sizes that are no multiple of
 * a sector or a cluster; contents written from a seed), and stdout, stderr and the exit code
 * must be the same — with the program name (`qemu-io:` → `qimg:`), the timing part of the
 * report lines and the description part of usage lines (`NAME ARGS -- TEXT`: the text is our
 * own wording) set aside.
 *
 * Covered: length, info, alloc, readv, writev, help, quit; and, on the older commands, the
 * table's word-count check, usage lines for a bad option or operand count, the read-only
 * refusal, "Pattern verification failed", "... failed: ..." lines and exit codes.
 */
import {
  closeSync,
  copyFileSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IO_COMMANDS } from "../src/io-script.js";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu)
  console.log("skipping qimg io command parity tests: qemu-img/qemu-io are not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-io-cmds-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const seed = Number(process.env.QIMG_SEED ?? Date.now() % 1_000_000);
const rnd = prng(seed);
const pick = (n: number): number => Math.floor(rnd() * n);

/** Every name and short name of qimg io's commands. */
const NAMES = new Set(
  IO_COMMANDS.flatMap((c) => (c.alt === undefined ? [c.name] : [c.name, c.alt])),
);

/** Set aside what may differ: the program name, timings, usage lines' descriptions. */
function normalize(text: string): string {
  return text
    .split("\n")
    .map((line) => {
      let l = line.replace(/^qemu-io: /, "qimg: ");
      l = l.replace(/^(.*, \d+ ops; ).*$/, "$1TIME");
      // -C: "bytes,ops,H:MM:SS.ss,bytes/sec,ops/sec"; the last three are timings.
      l = l.replace(/^(\d+,\d+,)\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$/, "$1TIME");
      const m = /^(\S+) (.*)-- /.exec(l);
      if (m !== null && NAMES.has(m[1] ?? "")) l = `${m[1] ?? ""} USAGE`;
      return l;
    })
    .join("\n");
}

interface Image {
  readonly file: string;
  readonly format: "qcow2" | "qed" | "raw";
  /** The disk size as qemu reports it. */
  readonly size: number;
  readonly clusterSize: number;
}

const images: Image[] = [];

/**
 * Run `cmds` through qemu-io and qimg io on twin copies of `img`; everything must agree.
 * `corruptImage`: the image ends up marked corrupt, so the files are compared byte for byte
 * (qemu-img compare refuses them).
 */
async function same(
  img: Image,
  cmds: readonly string[],
  readOnly = false,
  corruptImage = false,
): Promise<void> {
  const theirs = `${img.file}.theirs`;
  const ours = `${img.file}.ours`;
  copyFileSync(join(tmp, img.file), join(tmp, theirs));
  copyFileSync(join(tmp, img.file), join(tmp, ours));
  const args = (f: string): string[] => [
    "-f",
    img.format,
    ...(readOnly ? ["-r"] : []),
    ...cmds.flatMap((c) => ["-c", c]),
    f,
  ];
  const q = qemuIo(args(theirs), tmp);
  const o = await qimg(["io", ...args(ours)], tmp);
  const what = `seed ${seed}, ${img.format} ${img.size}${readOnly ? " -r" : ""}: ${cmds.join(" ; ")}`;
  expect(normalize(o.stdout), what).toBe(normalize(q.stdout));
  expect(normalize(o.stderr), what).toBe(normalize(q.stderr));
  expect(o.code, what).toBe(q.code);
  // The images must be left alike too.
  if (corruptImage) {
    // A corrupt image cannot be compared through qemu-img: the files themselves, then.
    const a = readFileSync(join(tmp, theirs));
    expect(a.equals(readFileSync(join(tmp, ours))), what).toBe(true);
    return;
  }
  const cmp = qemuImg(["compare", "-f", img.format, "-F", img.format, theirs, ours], tmp);
  expect(cmp.code, `${what}\n${cmp.stdout}${cmp.stderr}`).toBe(0);
}

beforeAll(() => {
  if (!hasQemu) return;
  const qcow2Size = 512 * (1500 + pick(2000));
  const qedSize = 512 * (1500 + pick(2000)) + 4096;
  const rawSize = 512 * (200 + pick(300));
  const qcow2Cluster = [4096, 65536][pick(2)] ?? 65536;
  const specs: [Image["format"], number, number][] = [
    ["qcow2", qcow2Size, qcow2Cluster],
    ["qed", qedSize, 65536],
    ["raw", rawSize, 0],
  ];
  for (const [format, size, clusterSize] of specs) {
    const opts = clusterSize > 0 ? ["-o", `cluster_size=${clusterSize}`] : [];
    const file = `base.${format}`;
    const r = qemuImg(["create", "-q", "-f", format, ...opts, file, String(size)], tmp);
    expect(r.code, r.stderr).toBe(0);
    // A few seeded writes so that alloc, map and reads have something to find.
    const cmds: string[] = [];
    for (let i = 0; i < 4; i++) {
      const off = pick(size - 4096);
      cmds.push(`write -q -P ${1 + pick(250)} ${off} ${1 + pick(Math.min(70000, size - off))}`);
    }
    const w = qemuIo(["-f", format, ...cmds.flatMap((c) => ["-c", c]), file], tmp);
    expect(w.code, w.stdout + w.stderr).toBe(0);
    images.push({ file, format, size, clusterSize });
  }
});

describe.skipIf(!hasQemu)("qimg io commands against qemu-io", () => {
  it("close, open, reopen -r/-w, truncate", async () => {
    for (const img of images) {
      const f = "other.img";
      copyFileSync(join(tmp, img.file), join(tmp, f));
      const grow = img.size + 512 * (1 + pick(4000));
      const shrink = img.size - 512 * (1 + pick(100));
      const scripts = [
        ["close", "length", "read 0 1", "close", "info", "map", "flush", "sleep 1", "open -r"],
        ["close", `open -r -o driver=${img.format} ${f}`, "length", "write 0 1", "read 0 512"],
        ["close", "open -r missing.img", "open", "open -r -f raw x", `open -r ${f} x`],
        [`open ${f}`, "reopen -r", "write 0 1", "reopen -w", "write -P 3 0 1", "read -P 3 0 1"],
        ["reopen", "reopen -r -w", "reopen -x", "reopen -o x=y", "reopen -r", "reopen -r"],
        [`truncate ${grow}`, "length", `read -P 0 ${img.size} 512`, "truncate", "truncate x"],
        ["truncate -m", "truncate -m bogus 1M", `truncate -m full ${Math.max(512, shrink)}`],
        ["close", `truncate ${grow}`, "reopen -r"],
      ];
      if (img.format !== "qed")
        scripts.push([`truncate ${shrink}`, "length", `truncate ${grow}`, "length"]);
      for (const cmds of scripts) {
        await same(img, cmds);
        await same(img, cmds, true);
      }
    }
  });

  it("length and info", async () => {
    for (const img of images) {
      await same(img, ["length", "info"]);
      await same(img, ["length", "info"], true);
      await same(img, ["length 1", "info x", "length"]);
    }
  });

  it("alloc: inside, across the end, past the end, bad numbers", async () => {
    for (const img of images) {
      const cmds = ["alloc 0", `alloc 0 ${img.size}`, "alloc 0 3G", `alloc ${img.size}`];
      for (let i = 0; i < 6; i++) {
        const off = pick(img.size);
        cmds.push(`alloc ${off} ${1 + pick(200_000)}`, `alloc ${off}`);
      }
      cmds.push(`alloc ${img.size - 100} 1000`, `alloc ${img.size + 1000} 5`, "alloc 1k 0");
      cmds.push("alloc", "alloc 1 2 3", "alloc x", "alloc 0 x", "alloc -1");
      await same(img, cmds);
      await same(img, cmds.slice(0, 6), true);
    }
  });

  it("readv and writev: several lengths, patterns, -v, -q, past the end, limits", async () => {
    for (const img of images) {
      const off = pick(img.size - 20_000);
      const lens = [1 + pick(3000), 1 + pick(5000), 1 + pick(700)];
      const total = lens.reduce((a, b) => a + b, 0);
      const p = 1 + pick(254);
      await same(img, [
        `writev -P ${p} ${off} ${lens.join(" ")}`,
        `readv -P ${p} ${off} ${lens.join(" ")}`,
        `readv -P ${p} ${off} ${total + 1}`,
        `read -P ${p} ${off} ${total}`,
        `readv -v ${off} 16 7`,
        `readv -q -P ${p} ${off} ${lens[0] ?? 1}`,
        `writev -q ${img.size - 100} 50 50`,
        `writev ${img.size - 100} 50 51`,
        `readv ${img.size - 10} 5 5 1`,
        "readv 0 0",
        "writev 0 0",
        "readv 0 3G",
        "readv 0 1G 1G 1G",
        "writev 0 1G 1G 1G",
        "readv 0",
        "readv -q 0",
        "readv -x 0 1",
        "readv 0 x",
        "readv -P 300 0 1",
        "writev -z 0 1",
        "writev -P 0x1ff 0 1",
        `writev -f 5 5`,
      ]);
      await same(img, [`readv -P 0 ${off} 512 512`, "writev 0 512", "writev 0"], true);
    }
  });

  it("help, quit and sleep", async () => {
    for (const img of images.slice(0, 1)) {
      await same(img, ["help nosuch", "help a b"]);
      // `help CMD`: the command's line (qemu-io adds its own longer text after it).
      for (const name of ["read", "r", "writev", "alloc", "?", "q"]) {
        const q = qemuIo(["-f", img.format, "-r", "-c", `help ${name}`, img.file], tmp);
        const o = await qimg(["io", "-f", img.format, "-r", "-c", `help ${name}`, img.file], tmp);
        expect(o.code, name).toBe(q.code);
        expect(normalize(o.stdout.split("\n")[0] ?? ""), name).toBe(
          normalize(q.stdout.split("\n")[0] ?? ""),
        );
        expect(normalize(o.stdout.split("\n")[0] ?? ""), name).toBe(`${name} USAGE`);
      }
      // Extended help (our own words, qemu-io's layout): present for the same commands, with
      // the same option letters in the same order, and the same blank-line structure.
      const letters = (t: string): string[] => [...t.matchAll(/^ -(\w), -- /gm)].map((m) => m[1]!);
      const shape = (t: string): string =>
        t
          .split("\n")
          .map((l) => (l === "" ? "" : l.startsWith(" Example:") ? "E" : "x"))
          .join("")
          .replace(/x+/g, "x");
      for (const { name } of IO_COMMANDS) {
        const q = qemuIo(["-f", img.format, "-r", "-c", `help ${name}`, img.file], tmp);
        const o = await qimg(["io", "-f", img.format, "-r", "-c", `help ${name}`, img.file], tmp);
        expect(letters(o.stdout), name).toEqual(letters(q.stdout));
        expect(shape(o.stdout), name).toBe(shape(q.stdout));
      }
      await same(img, ["length", "quit", "length", "write 0 1"]);
      await same(img, ["length", "q", "nosuch"]);
      const sleeps = ["sleep", "sleep x", "sleep 10", "sleep 1 2", "sleep -1", "sleep 0"];
      sleeps.push("sleep 1k", "sleep 0x10", "sleep 1.5", "sleep 010", "sleep +5", "sleep 09");
      await same(img, [...sleeps, "length"]);
      // Words split at spaces only: quotes and tabs stay in the words.
      await same(img, [
        'write -P "5" 0 1',
        "read -P '5' 0 1",
        "write  -q   0   1",
        "  length",
        "length  ",
        "\tlength",
        "read\t0 1",
      ]);
    }
  });

  it("help lists commands qemu-io has, in its layout", async () => {
    const img = images[0];
    if (img === undefined) throw new Error("no image");
    const q = qemuIo(["-f", img.format, "-c", "help", img.file], tmp);
    const o = await qimg(["io", "-f", img.format, "-r", "-c", "help", img.file], tmp);
    expect(o.code).toBe(q.code);
    const names = (text: string): string[] =>
      text
        .split("\n")
        .filter((l) => l.includes(" -- "))
        .map((l) => l.split(" ")[0] ?? "");
    const theirs = new Set(names(q.stdout));
    const ours = names(o.stdout);
    expect(ours.length).toBe(IO_COMMANDS.length);
    for (const n of ours) expect(theirs.has(n), n).toBe(true);
    expect([...ours].sort()).toEqual(ours);
    expect(o.stdout.endsWith("\n\nUse 'help commandname' for extended help.\n")).toBe(true);
    expect(q.stdout.endsWith("\n\nUse 'help commandname' for extended help.\n")).toBe(true);
  });

  it("read -s/-l: the pattern verified on part of the buffer", async () => {
    for (const img of images) {
      const off = pick(img.size - 5000);
      const len = 1 + pick(4000);
      const p = 1 + pick(254);
      const cut = pick(len);
      await same(img, [
        `write -P ${p} ${off} ${len}`,
        `read -P ${p} -l ${len} ${off} ${len + 1 + pick(500)}`,
        `read -P ${p} -l ${len + 1} ${off} ${len + 1}`,
        `read -P ${p} -s ${cut} ${off} ${len}`,
        `read -P ${p} -s ${cut} -l ${len - cut} -q ${off} ${len}`,
        `read -P 0 -s ${len} ${off - 1000 >= 0 ? off - 1000 : 0} ${len + 1}`,
        `read -P ${p} -s ${cut} -l ${len} ${off} ${len}`,
        `read -P ${p} -s ${len + 1} ${off} ${len}`,
        `read -s 5 ${off} ${len}`,
        `read -l 5 ${off} ${len}`,
        "read -P 0 -s x 0 1",
        "read -P 0 -l -1 0 1",
        `read -P ${p} -s 1 -v ${off} 40`,
      ]);
    }
  });

  it("write -s FILE: the file's bytes, repeated; unreadable and empty files", async () => {
    const src = new Uint8Array(1 + pick(3000)).map(() => pick(256));
    writeFileSync(join(tmp, "src.bin"), src);
    writeFileSync(join(tmp, "empty.bin"), new Uint8Array(0));
    for (const img of images) {
      const off = pick(img.size - 20_000);
      const len = 1 + pick(15_000);
      await same(img, [
        `write -s src.bin ${off} ${len}`,
        `read -v ${off} ${Math.min(len, 64)}`,
        `read -v ${off + len - 40} 40`,
        `write -q -s src.bin ${off} 1`,
        "write -s nosuch.bin 0 10",
        "write -s empty.bin 0 10",
        "write -s src.bin 0 0",
        "write -s . 0 4",
        "write -s src.bin -P 1 0 1",
        "write -s src.bin -z 0 1",
        `write -s src.bin ${img.size - 10} 11`,
      ]);
    }
  });

  it("an image this open marks corrupt: the request fails, then No medium found", async () => {
    // qcow2 with an L2 entry whose data offset is not cluster-aligned (iotest 060's kind).
    const size = 512 * (1000 + pick(2000));
    const file = "corrupt.qcow2";
    expect(qemuImg(["create", "-q", "-f", "qcow2", file, String(size)], tmp).code).toBe(0);
    const p = 1 + pick(254);
    expect(qemuIo(["-f", "qcow2", "-c", `write -P ${p} 0 200000`, file], tmp).code).toBe(0);
    const fd = openSync(join(tmp, file), "r+");
    const head = Buffer.alloc(48);
    readSync(fd, head, 0, 48, 0);
    const l1 = Number(head.readBigUInt64BE(40));
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, l1);
    const l2 = Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    readSync(fd, e, 0, 8, l2 + 8);
    e.writeBigUInt64BE(e.readBigUInt64BE(0) | 0x200n);
    writeSync(fd, e, 0, 8, l2 + 8);
    closeSync(fd);
    const img: Image = { file, format: "qcow2", size, clusterSize: 65536 };
    // stderr includes QEMU's corruption event line ("qcow2: Marking image as corrupt: ...",
    // read-only: "qcow2: Image is corrupt: ...").
    await same(
      img,
      [
        `read -P ${p} 0 512`,
        `read -P ${p} 65536 512`,
        "length",
        "alloc 0",
        "map",
        "flush",
        "info",
        "aio_read 0 1",
        "aio_flush",
        "discard 0 1",
        "write -z 0 1",
        "readv 0 1",
        "write 0 1",
      ],
      false,
      true,
    );
    await same(img, ["read 65536 1", "length", "info", "read 0 1"], true, true);
  });

  it("read -b / write -b (VM state): QED and raw refuse as qemu-io; qcow2's disk is untouched", async () => {
    const script = [
      "read -b -v 0 16",
      "read -b 1 512",
      "write -b 0 1",
      "write -b -z 0 512",
      "write -b -f 0 512",
      "write -c -f 0 512",
      "write -c 0x201 512",
      "write -c 1k 0x201",
    ];
    const io = ["write -b -P 9 0 512", "read -b -P 9 0 512"];
    for (const img of images) {
      if (img.format !== "qcow2") {
        await same(img, [...io, ...script]);
        continue;
      }
      // Known difference: QEMU keeps a qcow2 image's VM state past the disk; qimg does not
      // serve it and refuses (ENOTSUP), where it used to read and write the guest disk.
      await same(img, script);
      const ours = `${img.file}.vmstate`;
      copyFileSync(join(tmp, img.file), join(tmp, ours));
      const o = await qimg(["io", "-f", "qcow2", ...io.flatMap((c) => ["-c", c]), ours], tmp);
      expect(o.stdout).toBe(
        "write failed: Operation not supported\nread failed: Operation not supported\n",
      );
      expect(o.code).toBe(1);
      const cmp = qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", img.file, ours], tmp);
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    }
  });

  it("-C: the one-line machine-readable report", async () => {
    for (const img of images) {
      const off = pick(img.size - 5000);
      await same(img, [
        `read -C ${off} ${1 + pick(4000)}`,
        `write -C -P 3 ${off} ${1 + pick(4000)}`,
        `readv -C ${off} 512 ${1 + pick(999)}`,
        `writev -C ${off} 17 ${1 + pick(999)}`,
        `discard -C ${off} 512`,
        `write -C -z ${off} 1000`,
        `write -C -q ${off} 1`,
        `aio_read -C ${off} 100`,
        "aio_flush",
        `aio_write -C ${off} 100`,
        "aio_flush",
      ]);
    }
  });

  it("older commands: word counts, usage lines, read-only refusals, pattern mismatches, failures", async () => {
    for (const img of images) {
      const off = pick(img.size - 5000);
      await same(img, [
        `read -P 0x${(1 + pick(254)).toString(16)} ${off} 4000`,
        `read -q -P 0 ${off} 3000`,
        `read -v -P 1 ${img.size - 20} 20`,
        `write -P 9 ${off} 1000`,
        `read -P 9 ${off} 1000`,
        `read -P 9 ${off} 1001`,
        `aio_read -P 9 ${off} 500 500`,
        "aio_flush",
        `aio_write -P 4 ${off} 100 200`,
        "aio_flush",
        `read -P 4 ${off} 300`,
        "aio_read 0 3G",
        "aio_write -z 0 1 2",
        `read ${img.size - 1} 2`,
        `write ${img.size} 1`,
        "read -q 0",
        "read 0",
        "read 0 1 2",
        "write -q 0",
        "write -y 0 1",
        "read -P",
        "discard 0",
        "discard -q 0 1 2",
        "flush x",
        "map x",
        "sigraise",
        "nosuch 1",
        "aio_read -i 0 512",
        "aio_write -i -z 0 1",
        "aio_write -q -i",
        "aio_read -x -i 0 1",
        "aio_read -i -x 0 1",
        "aio_flush",
        `write -n ${off} 512`,
        `write -p ${off} 1`,
        `read -p -q ${off} 1`,
        "discard 0 3G",
        "write -z 0 3G",
        "write -n -z 0 3G",
        "read 0 3G",
        "write 0 3G",
        "r -v 0 3G",
        "r -x 1",
        "w -y 0 1",
        "d -P",
      ]);
      await same(img, ["aio_read -i 0 512", "aio_write -i 0 1", "aio_flush"]);
      if (img.format === "qcow2") {
        // A compressed write onto an allocated cluster: EIO, in qemu-io's words.
        // (One cluster: over several, which clusters QEMU writes before it stops is its own.)
        const cs = img.clusterSize;
        await same(img, ["write -P 3 0 512", `write -c 0 ${cs}`, `write -c -P 1 ${cs} ${cs}`]);
      }
      await same(
        img,
        ["write", "write 0 1", "aio_write 0", "discard 0 1", "writev 0 1 1", "read -P 0 0 0"],
        true,
      );
    }
  });
});
