import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { createQcow2 } from "@qimg/qcow2";
import { qimg } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "qimg-probe-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function overlay(name: string, backing: string, backingFormat?: string): Promise<string> {
  const file = join(tmp, name);
  const b = await FileBackend.open(file, { create: true, truncate: true });
  await createQcow2(b, {
    size: 1 << 20,
    backingFile: backing,
    ...(backingFormat ? { backingFormat } : {}),
  });
  await b.close();
  return file;
}

describe("backing files are never guessed to be raw", () => {
  it("refuses a backing file with no recorded format that is not qcow2 or QED", async () => {
    // Guest data in a raw file can look like anything; here it is plain bytes.
    writeFileSync(join(tmp, "base.raw"), new Uint8Array(1 << 20).fill(0x61));
    const top = await overlay("top.qcow2", "base.raw");
    const r = await qimg(["convert", "-O", "raw", top, join(tmp, "out.raw")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      /has no recorded format and is not qcow2 or QED; qimg does not guess raw/,
    );
  });

  it("opens the same chain when the format is recorded", async () => {
    const top = await overlay("top2.qcow2", "base.raw", "raw");
    const r = await qimg(["compare", "-f", "qcow2", "-F", "raw", top, join(tmp, "base.raw")]);
    expect(r.stdout).toBe("Images are identical.\n");
    expect(r.code).toBe(0);
  });

  it("still probes qcow2 backing files by magic when no format is recorded", async () => {
    const mid = await overlay("mid.qcow2", "base.raw", "raw");
    const top = await overlay("top3.qcow2", "mid.qcow2");
    const r = await qimg(["compare", "-f", "qcow2", "-F", "raw", top, join(tmp, "base.raw")]);
    expect(r.code, r.stderr).toBe(0);
    expect(mid).toContain("mid.qcow2");
  });
});
