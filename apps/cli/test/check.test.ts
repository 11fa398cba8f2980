import { spawnSync } from "node:child_process";
import { basename, dirname } from "node:path";
import { describe, expect, it } from "vitest";
import { copyFixture, fixturePath, listFixtures, requireQemu } from "@qimg/fixtures";
import { qimg } from "./helpers.js";

const hasQemu = requireQemu();
if (!hasQemu) console.log("skipping qimg check repair interop: qemu-img is not on PATH");

describe("qimg check gives qemu-img's verdict on every fixture", () => {
  for (const f of listFixtures()) {
    it(`${f.name}: JSON and exit code`, async () => {
      const path = fixturePath(f.name);
      const r = await qimg(["check", "--output=json", basename(path)], dirname(path));
      if (f.format === "raw") {
        expect(r.code).toBe(63);
        expect(r.stderr).toBe("qimg: This image format does not support checks\n");
        return;
      }
      const check = f.check!;
      expect(r.code).toBe(check.exitCode);
      if (check.json === null) {
        expect(r.stdout).toBe("");
        expect(r.stderr).toMatch(/^qimg: [^\n]+\n$/);
      } else {
        expect(JSON.parse(r.stdout)).toEqual(check.json);
      }
    });
  }
});

describe.skipIf(!hasQemu)("qimg check -r all leaves images qemu-img calls clean", () => {
  const broken = listFixtures({ broken: true }).filter((f) => f.check?.exitCode !== 1);
  for (const f of [
    ...broken,
    ...listFixtures().filter((x) => x.name === "qcow2-lazy-refcounts-dirty"),
  ]) {
    it(f.name, async () => {
      const file = copyFixture(f.name);
      const r = await qimg(["check", "-r", "all", basename(file)], dirname(file));
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(r.stdout).toMatch(/No errors were found on the image\./);
      const q = spawnSync("qemu-img", ["check", file], { encoding: "utf8" });
      expect(q.status, q.stdout + q.stderr).toBe(0);
    });
  }

  it("-r leaks frees leaked clusters", async () => {
    const file = copyFixture("qcow2-broken-leak-unused");
    const r = await qimg(["check", "-r", "leaks", basename(file)], dirname(file));
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(
      /The following inconsistencies were found and repaired:\n\n {4}1 leaked clusters\n {4}0 corruptions/,
    );
    const q = spawnSync("qemu-img", ["check", file], { encoding: "utf8" });
    expect(q.status).toBe(0);
  });

  it("plain check changes nothing", async () => {
    const file = copyFixture("qcow2-broken-leak-unused");
    const before = spawnSync("sha256sum", [file], { encoding: "utf8" }).stdout;
    const r = await qimg(["check", basename(file)], dirname(file));
    expect(r.code).toBe(3);
    expect(spawnSync("sha256sum", [file], { encoding: "utf8" }).stdout).toBe(before);
  });
});
