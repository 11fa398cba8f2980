import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { requireQemu } from "@qimg/fixtures";
import { afterAll, describe, expect, it } from "vitest";
import { captureContext } from "../src/context.js";
import { combinePath, openImage } from "../src/open.js";
import { qimg } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "qimg-open-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("combinePath (qemu's path_combine)", () => {
  it.each([
    ["top.qcow2", "base.raw", "base.raw"],
    ["dir/top.qcow2", "base.raw", "dir/base.raw"],
    ["/a/b/top.qcow2", "../base.raw", "/a/b/../base.raw"],
    ["dir/top.qcow2", "/abs/base.raw", "/abs/base.raw"],
  ])("%s + %s = %s", (base, name, want) => {
    expect(combinePath(base, name)).toBe(want);
  });
});

describe("openImage", () => {
  it("reads an unrecognised file as raw; warns only when opened for writing (as qemu-img)", async () => {
    const p = join(tmp, "plain.img");
    writeFileSync(p, new Uint8Array(4096).fill(7));
    const ctx = captureContext();
    const ro = await openImage(p, { ctx });
    expect(ro.format).toBe("raw");
    await ro.close();
    expect(ctx.out.stderr).toBe("");
    const rw = await openImage(p, { ctx, readOnly: false });
    await rw.close();
    expect(ctx.out.stderr).toMatch(
      /^WARNING: Image format was not specified for '.*plain\.img' and probing guessed raw\.\n/,
    );
    const forced = captureContext();
    await (await openImage(p, { ctx: forced, format: "raw", readOnly: false })).close();
    expect(forced.out.stderr).toBe("");
  });

  it.skipIf(!requireQemu())("refuses a backing chain that loops", async () => {
    const run = (...args: string[]): void => {
      const r = spawnSync("qemu-img", args, { cwd: tmp, encoding: "utf8" });
      expect(r.status, r.stderr).toBe(0);
    };
    run("create", "-q", "-f", "qcow2", "a.qcow2", "1M");
    run("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2");
    run("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2");
    const r = await qimg(["map", "b.qcow2"], tmp);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^qimg: .*loop in the backing chain\n$/);
    // info without --backing-chain does not open the backing file, so it still works.
    expect((await qimg(["info", "b.qcow2"], tmp)).code).toBe(0);
  });
});
