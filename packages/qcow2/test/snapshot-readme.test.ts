/**
 * The `## Snapshots` example of README.md runs as written (its imports pointed at this
 * package's source), on a disk.qcow2 made by qemu-img, and qemu-img checks the result.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it, vi } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import { scratchDirs } from "./twins.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("snapshot-readme.test: qemu-img not found, skipping");
const here = path.dirname(fileURLToPath(import.meta.url));
const fresh = scratchDirs("qimg-snapshot-readme-");
const module = path.join(here, `.snapshot-readme-${process.pid}.tmp.ts`);
afterAll(() => fs.rmSync(module, { force: true }));

/** The first ```ts block after `## Snapshots`. */
function example(): string {
  const readme = fs.readFileSync(path.join(here, "..", "README.md"), "utf8");
  const section = readme.slice(readme.indexOf("\n## Snapshots"));
  const m = /```ts\n([\s\S]*?)```/.exec(section);
  if (!m) throw new Error("README.md has no ts example under ## Snapshots");
  return m[1]!;
}

describe.skipIf(!haveQemu)("README ## Snapshots example", () => {
  it("runs, prints what its comments say, and leaves an image qemu-img checks clean", async () => {
    const dir = fresh();
    const disk = path.join(dir, "disk.qcow2");
    const c = spawnSync("qemu-img", ["create", "-f", "qcow2", disk, "1M"], { encoding: "utf8" });
    expect(c.status, c.stderr).toBe(0);
    const code = example()
      .replace('from "@qimg/qcow2"', 'from "../src/index.js"')
      .replaceAll('"disk.qcow2"', JSON.stringify(disk));
    fs.writeFileSync(module, `${code}\nexport {};\n`);
    const log = vi.spyOn(console, "log").mockImplementation(() => undefined);
    try {
      await import(/* @vite-ignore */ module);
      expect(log.mock.calls).toEqual([["1", 1]]);
    } finally {
      log.mockRestore();
    }
    const check = spawnSync("qemu-img", ["check", disk], { encoding: "utf8" });
    expect(check.status, check.stdout + check.stderr).toBe(0);
    const info = spawnSync("qemu-img", ["snapshot", "-l", disk], { encoding: "utf8" });
    expect(info.stdout).toBe("");
    const io = spawnSync("qemu-io", ["-c", "read -P 1 0 4096", disk], { encoding: "utf8" });
    expect(io.status, io.stdout + io.stderr).toBe(0);
    expect(io.stdout).not.toMatch(/Pattern verification failed/);
  });
});
