/**
 * `qimg info` on encrypted qcow2 images (LUKS with several cipher setups, legacy AES on
 * version 2 and 3, an encrypted overlay with --backing-chain, persistent bitmaps): the same
 * human and JSON output as `qemu-img info`, without a key. Reading or writing their data is
 * refused, and the file stays byte-identical.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { scratchDirs } from "../../../packages/qcow2/test/twins.js";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg } from "./qemu.js";

const newDir = scratchDirs("qimg-info-enc-");
if (!hasQemu) console.log("skipping encrypted info interop: qemu-img is not on PATH");

const SECRET = ["--object", "secret,id=sec0,data=abc"];

function create(
  dir: string,
  name: string,
  opts: string,
  size = "1M",
  extra: string[] = [],
): string {
  const file = join(dir, name);
  const r = qemuImg(["create", "-q", "-f", "qcow2", ...SECRET, "-o", opts, ...extra, file, size]);
  if (r.code !== 0) throw new Error(`qemu-img create ${opts}: ${r.stderr}`);
  return file;
}

const asQimg = (s: string): string => s.replaceAll("qemu-img: ", "qimg: ");

async function sameInfo(file: string, dir: string, args: string[] = []): Promise<void> {
  for (const output of ["human", "json"]) {
    const q = qemuImg(["info", ...args, `--output=${output}`, file], dir);
    const m = await qimg(["info", ...args, `--output=${output}`, file], dir);
    expect(q.code, q.stderr).toBe(0);
    expect(
      { code: m.code, out: m.stdout, err: m.stderr },
      `${file} ${args.join(" ")} ${output}`,
    ).toEqual({
      code: q.code,
      out: q.stdout,
      err: asQimg(q.stderr),
    });
  }
}

describe.skipIf(!hasQemu)("qimg info on encrypted qcow2 images", () => {
  it("LUKS: the header facts qemu-img shows, human and JSON", async () => {
    const dir = newDir();
    const luks = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    const files = [
      create(dir, "xts.qcow2", luks, "1M"),
      create(
        dir,
        "cbc.qcow2",
        `${luks},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1`,
        "3000000",
      ),
      create(
        dir,
        "plain.qcow2",
        `${luks},encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha512,cluster_size=131072`,
        "5M",
      ),
      create(
        dir,
        "serpent.qcow2",
        `${luks},encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=ctr,encrypt.ivgen-alg=plain64,lazy_refcounts=on,refcount_bits=64`,
        "7M",
      ),
    ];
    for (const f of files) await sameInfo(f, dir);
    // Persistent bitmaps: the encrypt object sits among them in qemu-img's key order.
    const bm = qemuImg([
      "bitmap",
      ...SECRET,
      "--image-opts",
      "--add",
      `driver=qcow2,file.filename=${files[0]!},encrypt.key-secret=sec0`,
      "b0",
    ]);
    expect(bm.code, bm.stderr).toBe(0);
    await sameInfo(files[0]!, dir);
  });

  it("legacy AES (version 2 and 3)", async () => {
    const dir = newDir();
    await sameInfo(create(dir, "aes3.qcow2", "encrypt.format=aes,encrypt.key-secret=sec0"), dir);
    await sameInfo(
      create(dir, "aes2.qcow2", "compat=0.10,encryption=on,encrypt.key-secret=sec0"),
      dir,
    );
  });

  it("an encrypted overlay, with and without --backing-chain", async () => {
    const dir = newDir();
    const base = join(dir, "base.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", base, "2M"]).code).toBe(0);
    const over = create(
      dir,
      "over.qcow2",
      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
      "3M",
      ["-b", "base.qcow2", "-F", "qcow2"],
    );
    await sameInfo(over, dir);
    await sameInfo(over, dir, ["--backing-chain"]);
  });

  it("reading or writing the data is refused; the file stays byte-identical", async () => {
    const dir = newDir();
    const file = create(
      dir,
      "x.qcow2",
      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    );
    const before = readFileSync(file);
    const out = join(dir, "out.raw");
    const runs = [
      ["convert", "-O", "raw", file, out],
      ["io", "-c", "write -P 1 0 4k", file],
      ["io", "-r", "-c", "read 0 4k", file],
      ["resize", file, "+1M"],
      ["map", file],
      ["dd", `if=${file}`, `of=${out}`, "-O", "raw"],
    ];
    for (const args of runs) {
      const r = await qimg(args);
      expect(r.code, args.join(" ")).not.toBe(0);
      expect(r.stderr, args.join(" ")).toMatch(
        /^qimg: .*encryption is not supported \(crypt_method luks\)\n$/,
      );
      expect(readFileSync(file).equals(before), args.join(" ")).toBe(true);
    }
    expect(existsSync(out)).toBe(false);
  });
});
