/**
 * Under an address-space limit (`ulimit -v`, as on shared build hosts) WebAssembly.Memory
 * cannot reserve its guard regions; the page-aligned copy buffers fall back to ordinary memory
 * and convert, compare and dd work as qemu-img does there. Runs the built executable
 * (dist/qimg.cjs; the source cannot run through tsx under the limit, tsx itself uses wasm).
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { CLI_DIR } from "./helpers.js";
import { hasQemu, prng, qemuImg } from "./qemu.js";

const BIN = join(CLI_DIR, "dist", "qimg.cjs");
if (!existsSync(BIN)) console.log("skipping ulimit -v tests: dist/qimg.cjs is not built");
if (!hasQemu) console.log("skipping ulimit -v tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-lowmem-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** KiB of address space: room for Node, not for a wasm memory's reservation. */
const LIMIT = 2_000_000;

function limited(args: readonly string[]): { code: number; stdout: string; stderr: string } {
  const quoted = [process.execPath, BIN, ...args].map((a) => `'${a.replace(/'/g, "'\\''")}'`);
  const r = spawnSync("bash", ["-c", `ulimit -v ${LIMIT} && exec ${quoted.join(" ")}`], {
    encoding: "utf8",
    env: { ...process.env, QIMG_NO_COMPILE_CACHE: "1" },
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

describe.skipIf(!existsSync(BIN) || !hasQemu)(`qimg under ulimit -v ${LIMIT}`, () => {
  it("convert, compare and dd work, with the same results as qemu-img", () => {
    const rnd = prng(4242);
    const size = 5 * 1024 * 1024 + 3333;
    const data = new Uint8Array(size);
    for (let i = 0; i < size; i++) data[i] = i % 3 === 0 ? 0 : Math.floor(rnd() * 256);
    data.fill(0, 1_000_000, 3_000_000);
    const raw = join(tmp, "src.raw");
    writeFileSync(raw, data);
    // qemu-img works under the same limit.
    const qemu = spawnSync("bash", [
      "-c",
      `ulimit -v ${LIMIT} && qemu-img convert -f raw -O qcow2 '${raw}' '${join(tmp, "q.qcow2")}'`,
    ]);
    expect(qemu.status).toBe(0);

    const q = join(tmp, "out.qcow2");
    const c1 = limited(["convert", "-f", "raw", "-O", "qcow2", raw, q]);
    expect(c1, "convert -O qcow2").toEqual({ code: 0, stdout: "", stderr: "" });
    const back = join(tmp, "back.raw");
    const c2 = limited(["convert", "-O", "raw", q, back]);
    expect(c2, "convert -O raw").toEqual({ code: 0, stdout: "", stderr: "" });
    const cmp = limited(["compare", "-f", "raw", "-F", "qcow2", raw, q]);
    expect(cmp.code, cmp.stderr).toBe(0);
    expect(cmp.stdout, "compare").toMatch(/Images are identical\.\n$/);
    const dd = join(tmp, "dd.raw");
    const d = limited(["dd", "-f", "qcow2", "-O", "raw", `if=${q}`, `of=${dd}`, "bs=65536"]);
    expect(d.code, d.stderr).toBe(0);
    expect(d.stderr).not.toMatch(/internal error/);
    for (const out of [back, dd]) {
      expect(qemuImg(["compare", "-f", "raw", "-F", "raw", raw, out]).stdout, out).toBe(
        "Images are identical.\n",
      );
    }
    expect(qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw, q]).stdout).toBe(
      "Images are identical.\n",
    );
  });
});
