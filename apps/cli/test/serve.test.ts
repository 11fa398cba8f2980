/**
 * `qimg serve` against real NBD clients: qemu-img convert reads the guest content of every
 * kind of image over a Unix socket and over TCP; nbdinfo --map reports what `qimg map` does;
 * qemu-io writes through the export change the image as on a twin written directly; six
 * clients at once read the same bytes; -r refuses writes and leaves the file untouched;
 * SIGTERM leaves a clean image.
 */
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { seededRandom } from "@qimg/io";
import { describe, expect, it } from "vitest";
import { NbdCmd, NbdError, TransmissionFlag } from "@qimg/nbd";
import { qimg } from "./helpers.js";
import { NbdTestClient } from "./nbd-client.js";
import {
  freePort,
  nbdMap,
  requireNbd,
  serveScratch,
  startQemuNbd,
  startServe,
  tool,
  toolAsync,
  unixUri,
} from "./serve-helpers.js";

const hasNbd = requireNbd();
const SEED = Number(process.env.QIMG_SEED ?? 1616);

const scratch = serveScratch("qimg-serve-");

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  if (r.code !== 0) throw new Error(`${what} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

/** A fresh, empty subdirectory `name` of the scratch directory. */
function workDir(name: string): string {
  const d = join(scratch.dir, name);
  rmSync(d, { recursive: true, force: true });
  mkdirSync(d, { recursive: true });
  return d;
}

/** Run qemu-io's `cmds` on `file` with `opts` (`-f FMT`, …); throws naming `what` if it fails. */
function qemuIo(
  file: string,
  opts: readonly string[],
  cmds: readonly string[],
  what = "qemu-io",
): void {
  ok(tool("qemu-io", [...opts, ...cmds.flatMap((c) => ["-c", c]), file]), what);
}

/** A raw file of `size` bytes: runs of random data, zeros and a repeated byte (seeded). */
function makeRaw(path: string, size: number, seed: number): void {
  const rnd = seededRandom(seed);
  const buf = new Uint8Array(size);
  for (let at = 0; at < size;) {
    const n = Math.min(size - at, 512 + Math.floor(rnd() * 300_000));
    const kind = rnd();
    if (kind < 0.45) for (let i = 0; i < n; i++) buf[at + i] = Math.floor(rnd() * 256);
    else if (kind < 0.6) buf.fill(0x5a, at, at + n);
    at += n;
  }
  writeFileSync(path, buf);
}

const sha = (path: string): string => createHash("sha256").update(readFileSync(path)).digest("hex");

/** `qimg map --output=json` folded into nbdinfo's [offset, length, hole|zero flags] runs. */
async function qimgMapAsNbd(file: string, format: string): Promise<[number, number, number][]> {
  const r = await qimg(["map", "--output=json", "-f", format, file]);
  expect(r.stderr).toBe("");
  const out: [number, number, number][] = [];
  for (const e of JSON.parse(r.stdout) as {
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }[]) {
    const flags = (e.data ? 0 : 1) | (e.zero ? 2 : 0);
    const last = out[out.length - 1];
    if (last !== undefined && last[2] === flags) last[1] += e.length;
    else out.push([e.start, e.length, flags]);
  }
  return out;
}

interface Source {
  readonly name: string;
  readonly format: string;
  make(dir: string): string;
}

// Sizes not multiples of the cluster size; qcow2/QED sizes are multiples of 512 (qemu-img's rounding).
const SIZE = 5 * 1024 * 1024 + 7 * 512;

/**
 * `SIZE` bytes of seeded raw content in D/src.raw, converted by qemu-img to D/NAME in
 * `format`, with the further convert options `opts` (`-c`, `-o …`). Returns D/NAME.
 */
function convertedRaw(
  d: string,
  seed: number,
  name: string,
  format: string,
  opts: readonly string[] = [],
): string {
  const src = join(d, "src.raw");
  const f = join(d, name);
  makeRaw(src, SIZE, seed);
  ok(tool("qemu-img", ["convert", ...opts, "-f", "raw", "-O", format, src, f]), "convert");
  return f;
}

const SOURCES: readonly Source[] = [
  {
    name: "qcow2 zlib-compressed",
    format: "qcow2",
    make: (d) => {
      const f = convertedRaw(d, SEED, "z.qcow2", "qcow2", ["-c", "-o", "compression_type=zlib"]);
      qemuIo(f, ["-f", "qcow2"], ["write -P 0x11 1000k 300k", "write -z 2M 512k"]);
      return f;
    },
  },
  {
    name: "qcow2 zstd-compressed",
    format: "qcow2",
    make: (d) =>
      convertedRaw(d, SEED + 1, "zs.qcow2", "qcow2", ["-c", "-o", "compression_type=zstd"]),
  },
  {
    name: "qcow2 extended L2",
    format: "qcow2",
    make: (d) => {
      const f = convertedRaw(d, SEED + 2, "x.qcow2", "qcow2", [
        "-o",
        "extended_l2=on,cluster_size=128k",
      ]);
      qemuIo(f, ["-f", "qcow2"], ["write -z 4k 8k", "write -P 0x77 300k 5k", "discard 1M 256k"]);
      return f;
    },
  },
  {
    name: "qcow2 backing chain (qcow2 over QED over raw)",
    format: "qcow2",
    make: (d) => {
      makeRaw(join(d, "base.raw"), SIZE, SEED + 3);
      const mid = join(d, "mid.qed");
      const top = join(d, "top.qcow2");
      ok(
        tool("qemu-img", ["create", "-f", "qed", "-b", "base.raw", "-F", "raw", mid]),
        "create mid",
      );
      qemuIo(mid, ["-f", "qed"], ["write -P 0x22 64k 200k"], "qemu-io mid");
      ok(
        tool("qemu-img", ["create", "-f", "qcow2", "-b", "mid.qed", "-F", "qed", top]),
        "create top",
      );
      qemuIo(top, ["-f", "qcow2"], ["write -P 0x33 100k 10k", "write -z 3M 64k"], "qemu-io top");
      return top;
    },
  },
  {
    name: "QED",
    format: "qed",
    make: (d) => convertedRaw(d, SEED + 4, "q.qed", "qed"),
  },
  {
    name: "raw",
    format: "raw",
    make: (d) => {
      makeRaw(join(d, "r.raw"), SIZE + 123, SEED + 5);
      return join(d, "r.raw");
    },
  },
];

describe.skipIf(!hasNbd)("qimg serve with real NBD clients", () => {
  it.each(SOURCES.map((s, i) => [s.name, s, i] as const))(
    "%s: qemu-img convert over a Unix socket reads the guest content; nbdinfo --map matches qimg map",
    async (_name, source, i) => {
      const d = workDir(`src${i}`);
      const file = source.make(d);
      const before = sha(file);
      const expectedMap = await qimgMapAsNbd(file, source.format);
      const socket = join(d, "s.sock");
      const server = await scratch.serveOn(["-t", "-r", "-f", source.format, file], socket);
      const out = join(d, "out.raw");
      ok(tool("qemu-img", ["convert", "-f", "raw", unixUri(socket), out]), "convert over NBD");
      const cmp = tool("qemu-img", ["compare", "-f", "raw", "-F", source.format, out, file]);
      expect(cmp.stdout + cmp.stderr).toBe("Images are identical.\n");
      expect(nbdMap(unixUri(socket))).toEqual(expectedMap);
      expect(await server.stop("SIGTERM")).toBe(0);
      expect(sha(file)).toBe(before);
    },
  );

  it("over TCP on 127.0.0.1 with -x NAME (qemu-img convert, nbdcopy)", async () => {
    const d = workDir("tcp");
    const file = SOURCES[0]!.make(d);
    const port = await freePort();
    const server = scratch.track(
      await startServe(
        ["-t", "-p", String(port), "-b", "127.0.0.1", "-x", "disk one", "-f", "qcow2", file],
        { port },
      ),
    );
    const uri = `nbd://127.0.0.1:${port}/disk%20one`;
    ok(tool("qemu-img", ["convert", "-f", "raw", uri, join(d, "out.raw")]), "convert over TCP");
    expect(
      tool("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", join(d, "out.raw"), file]).code,
    ).toBe(0);
    ok(tool("nbdcopy", [uri, join(d, "out2.raw")]), "nbdcopy");
    expect(
      tool("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", join(d, "out2.raw"), file]).code,
    ).toBe(0);
    // The wrong name is refused (NBD_REP_ERR_UNKNOWN), the server keeps running.
    const wrong = tool("qemu-img", ["info", "-f", "raw", `nbd://127.0.0.1:${port}/other`]);
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/other/);
    const list = tool("nbdinfo", ["--list", `nbd://127.0.0.1:${port}`]);
    expect(list.stdout).toContain('export="disk one"');
    expect(await server.stop("SIGINT")).toBe(0);
  });

  it("qemu-io writes, zero writes, discards and flushes through the export change the image as on a twin", async () => {
    for (const [fmt, opts] of [
      ["qcow2", "cluster_size=65536"],
      ["qcow2", "cluster_size=4096,lazy_refcounts=on"],
      ["qed", ""],
    ] as const) {
      const d = workDir(`rw-${fmt}-${opts.length}`);
      const a = join(d, `a.${fmt}`);
      const b = join(d, `b.${fmt}`);
      for (const f of [a, b]) {
        ok(
          tool("qemu-img", ["create", "-f", fmt, ...(opts ? ["-o", opts] : []), f, String(SIZE)]),
          "create",
        );
        qemuIo(f, ["-f", fmt], ["write -P 0x99 0 1500k"], "prefill");
      }
      const rnd = seededRandom(SEED + opts.length);
      const cmds: string[] = [];
      for (let k = 0; k < 12; k++) {
        const off = Math.floor((rnd() * (SIZE - 300_000)) / 512) * 512;
        const len = 512 * (1 + Math.floor(rnd() * 500));
        const pick = rnd();
        if (pick < 0.5) cmds.push(`write -P 0x${(1 + k).toString(16)} ${off} ${len}`);
        else if (pick < 0.75) cmds.push(`write -z ${off} ${len}`);
        else cmds.push(`discard ${off} ${len}`);
      }
      cmds.push("flush");
      const socket = join(d, "s.sock");
      const server = await scratch.serveOn(["--discard=unmap", "-f", fmt, a], socket);
      const viaNbd = tool("qemu-io", [
        "-f",
        "raw",
        ...cmds.flatMap((c) => ["-c", c]),
        unixUri(socket),
      ]);
      expect(viaNbd.code, viaNbd.stderr).toBe(0);
      expect(viaNbd.stderr).toBe("");
      expect(await server.exited).toBe(0); // not persistent: leaves with its last client
      qemuIo(b, ["-f", fmt, "-d", "unmap"], cmds, "twin");
      const check = tool("qemu-img", ["check", "-f", fmt, a]);
      expect(check.code, `${check.stdout}${check.stderr}\n${cmds.join("\n")}`).toBe(0);
      const cmp = tool("qemu-img", ["compare", "-f", fmt, "-F", fmt, a, b]);
      expect(cmp.stdout, cmds.join("\n")).toBe("Images are identical.\n");
    }
  });

  it("six clients at once (-e 8) read identical bytes", async () => {
    const d = workDir("six");
    const file = SOURCES[1]!.make(d);
    const socket = join(d, "s.sock");
    const server = await scratch.serveOn(["-e", "8", "-f", "qcow2", file], socket);
    const outs = [0, 1, 2, 3, 4, 5].map((i) => join(d, `out${i}.raw`));
    const runs = await Promise.all(
      outs.map((o, i) =>
        i % 2 === 0
          ? toolAsync("nbdcopy", [unixUri(socket), o])
          : toolAsync("qemu-img", ["convert", "-f", "raw", unixUri(socket), o]),
      ),
    );
    for (const r of runs) expect(r.code, r.stderr).toBe(0);
    const first = sha(outs[0]!);
    for (const o of outs) expect(sha(o)).toBe(first);
    expect(tool("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", outs[0]!, file]).code).toBe(0);
    expect(await server.exited).toBe(0);
  });

  it("-r refuses writes (EPERM) and leaves the file byte-identical", async () => {
    const d = workDir("ro");
    const file = SOURCES[2]!.make(d);
    const before = sha(file);
    const socket = join(d, "s.sock");
    const server = await scratch.serveOn(["-r", "-t", file], socket);
    const info = tool("nbdinfo", [unixUri(socket)]);
    expect(info.stdout).toMatch(/is_read_only: true/);
    const w = tool("qemu-io", ["-f", "raw", "-c", "write -P 1 0 64k", unixUri(socket)]);
    // qemu-io sees NBD_FLAG_READ_ONLY and will not open the export for writing.
    expect(w.stdout + w.stderr).toMatch(/Permission denied/);
    // A client that writes anyway gets EPERM for every kind of write.
    const client = await NbdTestClient.connect({ socket });
    expect(client.flags & TransmissionFlag.READ_ONLY).not.toBe(0);
    expect((await client.request(NbdCmd.WRITE, 0, 4, 0, new Uint8Array([1, 2, 3, 4]))).error).toBe(
      NbdError.EPERM,
    );
    expect((await client.request(NbdCmd.WRITE_ZEROES, 0, 65536)).error).toBe(NbdError.EPERM);
    expect((await client.request(NbdCmd.TRIM, 0, 65536)).error).toBe(NbdError.EPERM);
    expect((await client.request(NbdCmd.READ, 0, 4)).error).toBe(0);
    await client.disconnect();
    makeRaw(join(d, "new.raw"), 1 << 20, SEED);
    const c = tool("qemu-img", [
      "convert",
      "-n",
      "-f",
      "raw",
      "-O",
      "raw",
      join(d, "new.raw"),
      unixUri(socket),
    ]);
    expect(c.code).not.toBe(0);
    expect(await server.stop()).toBe(0);
    expect(sha(file)).toBe(before);
  });

  it("-B NAME: nbdinfo --map=qemu:dirty-bitmap:NAME reports the bitmap's dirty ranges as through qemu-nbd", async () => {
    const d = workDir("bitmap");
    const file = join(d, "b.qcow2");
    ok(
      tool("qemu-img", ["create", "-f", "qcow2", "-o", "cluster_size=4096", file, String(SIZE)]),
      "create",
    );
    ok(tool("qemu-img", ["bitmap", "--add", "-g", "16384", file, "bm"]), "bitmap --add");
    ok(tool("qemu-img", ["bitmap", "--add", file, "other"]), "bitmap --add other");
    const rnd = seededRandom(SEED + 9);
    const cmds: string[] = [];
    for (let k = 0; k < 10; k++) {
      cmds.push(
        `write -P ${k + 1} ${Math.floor((rnd() * (SIZE - 200_000)) / 512) * 512} ${512 * (1 + Math.floor(rnd() * 300))}`,
      );
    }
    qemuIo(file, ["-f", "qcow2"], cmds);
    const before = sha(file);
    const qs = join(d, "q.sock");
    const q = scratch.track(
      await startQemuNbd(["-t", "-r", "-B", "bm", "-f", "qcow2", "-k", qs, file], { socket: qs }),
    );
    const expected = nbdMap(unixUri(qs), "qemu:dirty-bitmap:bm");
    const expectedAlloc = nbdMap(unixUri(qs));
    await q.stop();
    expect(expected.some((e) => e[2] === 1)).toBe(true);
    const socket = join(d, "s.sock");
    const server = await scratch.serveOn(["-t", "-r", "-B", "bm", "-f", "qcow2", file], socket);
    expect(nbdMap(unixUri(socket), "qemu:dirty-bitmap:bm")).toEqual(expected);
    expect(nbdMap(unixUri(socket))).toEqual(expectedAlloc);
    const list = tool("nbdinfo", ["--list", "--content", unixUri(socket)]);
    expect(list.stdout).toContain("qemu:dirty-bitmap:bm");
    expect(list.stdout).not.toContain("qemu:dirty-bitmap:other");
    expect(await server.stop()).toBe(0);
    expect(sha(file)).toBe(before);
    const r = await qimg(["serve", "-k", join(d, "never.sock"), "-B", "nope", file]);
    expect(r.stderr).toBe("qimg: Bitmap 'nope' is not found\n");
    expect(r.code).toBe(1);
  });

  it.each([[[]], [["-r"]], [["-e", "3"]], [["-r", "-e", "2", "-x", "nm"]]])(
    "nbdinfo shows the same export facts and flags as qemu-nbd %j",
    async (flags) => {
      const d = workDir(`facts-${flags.join("")}`);
      const a = join(d, "a.qcow2");
      const b = join(d, "b.qcow2");
      ok(tool("qemu-img", ["create", "-f", "qcow2", a, String(SIZE)]), "create");
      ok(tool("qemu-img", ["create", "-f", "qcow2", b, String(SIZE)]), "create");
      const name = flags.includes("nm") ? "nm" : "";
      const qs = join(d, "q.sock");
      const q = scratch.track(
        await startQemuNbd([...flags, "-t", "-f", "qcow2", "-k", qs, a], { socket: qs }),
      );
      const socket = join(d, "s.sock");
      const server = await scratch.serveOn([...flags, "-t", "-f", "qcow2", b], socket);
      const facts = (s: string): string =>
        ok(tool("nbdinfo", [unixUri(s, name)]), "nbdinfo").replace(/\turi: .*\n/, "");
      expect(facts(socket)).toBe(facts(qs));
      await q.stop();
      expect(await server.stop()).toBe(0);
    },
  );

  it("refuses bad flag values with qemu-nbd's messages and exit code, file untouched", async () => {
    const d = workDir("flags");
    const file = join(d, "f.qcow2");
    ok(tool("qemu-img", ["create", "-f", "qcow2", file, "1M"]), "create");
    const before = sha(file);
    for (const [args, line] of [
      [["-e", "x"], "qimg: Invalid shared device number 'x'\n"],
      [["--cache=foo"], "qimg: Invalid cache mode `foo'\n"],
      [["--discard=foo"], "qimg: Invalid discard mode `foo'\n"],
      [
        ["--detect-zeroes=foo"],
        "qimg: Failed to parse detect_zeroes mode: invalid parameter value: foo\n",
      ],
      [
        ["--detect-zeroes=unmap"],
        "qimg: setting detect-zeroes to unmap is not allowed without setting discard operation to unmap\n",
      ],
    ] as const) {
      const r = await qimg(["serve", "-k", join(d, "never.sock"), ...args, file]);
      expect(r.stderr).toBe(line);
      expect(r.code).toBe(1);
    }
    expect(sha(file)).toBe(before);
  });
});
