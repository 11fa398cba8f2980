/**
 * Every fixture through info, map, convert and compare, checked against what qemu-img 7.2
 * recorded in the fixtures' manifest.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import {
  fixturePath,
  listFixtures,
  normalizeMap,
  type FixtureEntry,
  type MapEntry,
} from "@qimg/fixtures";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "qimg-cli-test-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function where(f: FixtureEntry): { dir: string; name: string } {
  const path = fixturePath(f.name);
  return { dir: dirname(path), name: basename(path) };
}

/** Drop the keys qemu-img and qimg cannot agree on (actual-size depends on the file system). */
function comparable(info: unknown): unknown {
  if (Array.isArray(info)) return info.map(comparable);
  const { ["actual-size"]: _ignored, ...rest } = info as Record<string, unknown>;
  return rest;
}

/*
 * Where qemu-img maps allocated data it also asks the host file system for holes (SEEK_HOLE) and
 * marks those bytes `zero` too, so its answer depends on how the file was written (qcow2-mixed:
 * "4 KiB data + 60 KiB data-and-zero" on a sparse file). qimg describes the image, not the host
 * file system, so both sides go through the fixtures' normalizeMap, which drops exactly that.
 */

for (const f of listFixtures()) {
  describe(`fixture ${f.name}`, () => {
    if (f.info !== null) {
      const info = f.info;
      it("info --output=json matches qemu-img", async () => {
        const { dir, name } = where(f);
        const r = await qimg(["info", "--output=json", name], dir);
        expect(r.stderr).toBe("");
        expect(r.code).toBe(0);
        expect(comparable(JSON.parse(r.stdout))).toEqual(comparable(info));
      });
    } else {
      it("info fails with one line and exit 1, like qemu-img", async () => {
        const { dir, name } = where(f);
        const r = await qimg(["info", name], dir);
        expect(r.code).toBe(1);
        expect(r.stdout).toBe("");
        expect(r.stderr).toMatch(new RegExp(`^qimg: ${name}: [^\\n]+\\n$`));
      });
    }

    if (f.map !== null) {
      const map = f.map;
      it("map --output=json matches qemu-img", async () => {
        const { dir, name } = where(f);
        const r = await qimg(["map", "--output=json", name], dir);
        expect(r.stderr).toBe("");
        expect(r.code).toBe(0);
        expect(normalizeMap(JSON.parse(r.stdout) as MapEntry[])).toEqual(normalizeMap(map));
      });
    }

    if (f.sha256 !== null) {
      const sha = f.sha256;
      it("convert -O raw matches qemu-img's sha256, and compares identical", async () => {
        const { dir, name } = where(f);
        const out = join(tmp, `${f.name}.raw`);
        const r = await qimg(["convert", "-O", "raw", name, out], dir);
        expect(r.stderr).toBe("");
        expect(r.code).toBe(0);
        expect(createHash("sha256").update(readFileSync(out)).digest("hex")).toBe(sha);
        const c = await qimg(["compare", "-F", "raw", name, out], dir);
        expect(c).toEqual({ code: 0, stdout: "Images are identical.\n", stderr: "" });
      });
    }
  });
}
