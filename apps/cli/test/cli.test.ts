/**
 * The CLI as a real process: version, help, usage errors, and a raw image end to end.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimgVersion } from "../src/cli.js";
import { CLI_DIR, qimg, qimgProcess } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "qimg-cli-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("qimg as a process", () => {
  it("--version prints qimg <version> from package.json", () => {
    const pkg = JSON.parse(readFileSync(join(CLI_DIR, "package.json"), "utf8")) as {
      version: string;
    };
    const r = qimgProcess(["--version"]);
    expect(r).toEqual({ code: 0, stdout: `qimg ${pkg.version}\n`, stderr: "" });
    expect(qimgVersion()).toBe(pkg.version);
  });

  it("unknown command: one line on stderr, exit 1", () => {
    const r = qimgProcess(["frobnicate"]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toBe("qimg: unknown command 'frobnicate'\n");
  });

  it("unknown option: one line on stderr, exit 1", () => {
    const r = qimgProcess(["info", "--bogus", "x"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("qimg: unknown option '--bogus'\n");
  });

  it("a missing file: qimg: <file>: <message>, no stack, exit 1", () => {
    const r = qimgProcess(["info", "/nonexistent/disk.qcow2"]);
    expect(r).toEqual({
      code: 1,
      stdout: "",
      stderr: "qimg: /nonexistent/disk.qcow2: No such file or directory\n",
    });
  });

  it("--debug adds the stack", () => {
    const r = qimgProcess(["--debug", "info", "/nonexistent/disk.qcow2"]);
    expect(r.code).toBe(1);
    expect(r.stderr.split("\n")[0]).toBe(
      "qimg: /nonexistent/disk.qcow2: No such file or directory",
    );
    expect(r.stderr).toMatch(/\n\s+at /);
  });

  it("raw image end to end: info, map, convert, compare, dd", () => {
    const src = join(tmp, "src.raw");
    const data = new Uint8Array(1 << 20);
    data.fill(0xab, 0, 4096);
    data.fill(0xcd, 600000, 700000);
    writeFileSync(src, data);
    const info = qimgProcess(["info", "-f", "raw", "--output", "json", src]);
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({
      "virtual-size": 1 << 20,
      filename: src,
      format: "raw",
      "dirty-flag": false,
    });
    expect(qimgProcess(["map", "-f", "raw", "--output=json", src]).code).toBe(0);
    const out = join(tmp, "out.raw");
    expect(qimgProcess(["convert", "-f", "raw", "-O", "raw", src, out])).toEqual({
      code: 0,
      stdout: "",
      stderr: "",
    });
    const sha = (p: string): string => createHash("sha256").update(readFileSync(p)).digest("hex");
    expect(sha(out)).toBe(sha(src));
    expect(statSync(out).blocks * 512).toBeLessThan(1 << 20);
    expect(qimgProcess(["compare", src, out])).toEqual({
      code: 0,
      stdout: "Images are identical.\n",
      stderr: "",
    });
    const dd = join(tmp, "dd.raw");
    expect(
      qimgProcess(["dd", "-f", "raw", `if=${src}`, `of=${dd}`, "bs=64k", "skip=9", "count=11"])
        .code,
    ).toBe(0);
    expect(readFileSync(dd)).toEqual(Buffer.from(data.subarray(9 * 65536, 11 * 65536)));
    const c = qimgProcess(["compare", "-f", "raw", "-F", "raw", src, dd]);
    expect(c.code).toBe(1);
    expect(c.stdout).toBe("Content mismatch at offset 0!\n");
  });
});

describe("commands in-process", () => {
  it("every command has --help, exit 0, on stdout", async () => {
    for (const name of ["info", "map", "convert", "compare", "dd", "create", "io", "bench"]) {
      const r = await qimg([name, "--help"]);
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`^Usage: qimg ${name} `));
    }
  });

  it("--help lists only working commands", async () => {
    const r = await qimg(["--help"]);
    expect(r.code).toBe(0);
    const commands = [...r.stdout.matchAll(/^ {2}(\w+) /gm)].map((m) => m[1]);
    expect(commands.sort()).toEqual([
      "amend",
      "bench",
      "bitmap",
      "check",
      "commit",
      "compare",
      "convert",
      "create",
      "dd",
      "help",
      "info",
      "io",
      "map",
      "measure",
      "rebase",
      "resize",
      "serve",
      "snapshot",
    ]);
  });

  it("no arguments: one line, exit 1", async () => {
    expect(await qimg([])).toEqual({
      code: 1,
      stdout: "",
      stderr: "qimg: Not enough arguments (try 'qimg --help')\n",
    });
  });

  it("an unknown -f format names the driver", async () => {
    const p = join(tmp, "f.raw");
    writeFileSync(p, new Uint8Array(512));
    expect(await qimg(["info", "-f", "vmdk", p])).toEqual({
      code: 1,
      stdout: "",
      stderr: `qimg: ${p}: Unknown driver 'vmdk'\n`,
    });
  });

  it("convert refuses unknown formats, and to overwrite its input", async () => {
    const p = join(tmp, "g.raw");
    writeFileSync(p, new Uint8Array(512));
    const r = await qimg(["convert", "-O", "vmdk", p, join(tmp, "g.vmdk")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("qimg: Unknown file format 'vmdk'\n");
    const same = await qimg(["convert", "-f", "raw", p, p]);
    expect(same.code).toBe(1);
    expect(readFileSync(p).length).toBe(512);
  });

  it("dd operand errors use qemu-img's words", async () => {
    expect((await qimg(["dd", "if=a"])).stderr).toBe(
      "qimg: Must specify both input and output files\n",
    );
    expect((await qimg(["dd", "foo=1", "if=a", "of=b"])).stderr).toBe(
      "qimg: unrecognized operand foo\n",
    );
    expect((await qimg(["dd", "bs=0", "if=a", "of=b"])).stderr).toBe(
      "qimg: Invalid bs specified. Must be between 1 and 2147483647.\n",
    );
    expect((await qimg(["dd", "bs=1.5", "if=a", "of=b"])).code).toBe(1);
  });

  it("compare -q prints nothing", async () => {
    const a = join(tmp, "qa.raw");
    const b = join(tmp, "qb.raw");
    writeFileSync(a, new Uint8Array(4096));
    writeFileSync(b, Uint8Array.of(1));
    expect(await qimg(["compare", "-q", "-f", "raw", "-F", "raw", a, b])).toEqual({
      code: 1,
      stdout: "",
      stderr: "",
    });
  });
});
