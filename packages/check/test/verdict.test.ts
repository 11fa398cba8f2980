import { describe, expect, it } from "vitest";
import { fixturePath, listFixtures } from "@qimg/fixtures";
import { FileBackend } from "@qimg/io/node";
import { QimgError } from "@qimg/structs";
import { checkImage, formatCheckHuman, formatCheckJson, toQemuJson } from "../src/index.js";
import type { CheckResult } from "../src/index.js";
import { haveQemu, qemuCheck } from "./helpers.js";

const fixtures = listFixtures().filter((f) => f.format !== "raw");

async function check(name: string, format: "qcow2" | "qed", main: string): Promise<CheckResult> {
  const backend = await FileBackend.open(fixturePath(name), { readOnly: true });
  try {
    return await checkImage(backend, format, { filename: main });
  } finally {
    await backend.close();
  }
}

describe("read-only check matches qemu-img check's recorded verdict", () => {
  for (const f of fixtures) {
    const expected = f.check!;
    it(`${f.name}: exit ${expected.exitCode}`, async () => {
      const format = f.format as "qcow2" | "qed";
      if (expected.exitCode === 1 && expected.json === null) {
        // qemu-img cannot open it: we must fail with a typed error (exit code 1).
        const err = await check(f.name, format, f.main).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(err).toBeInstanceOf(QimgError);
        expect((err as QimgError).code).toMatch(/^QIMG_/);
        return;
      }
      const r = await check(f.name, format, f.main);
      expect(toQemuJson(r)).toEqual(expected.json);
      expect(Object.keys(toQemuJson(r)!).sort()).toEqual(Object.keys(expected.json!).sort());
      expect(r.exitCode).toBe(expected.exitCode);
      // Per-item lines, in qemu's words and order.
      if (f.format === "qcow2") {
        expect(r.messages.map((m) => `${m.text}\n`).join("")).toBe(expected.stderr);
      }
    });
  }
});

describe("human and JSON output equal qemu-img check's (interop)", () => {
  for (const f of fixtures) {
    it(f.name, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      const path = fixturePath(f.name);
      const q = qemuCheck(path);
      const qj = qemuCheck(path, "--output=json");
      let r: CheckResult;
      try {
        r = await check(f.name, f.format as "qcow2" | "qed", f.main);
      } catch (e) {
        expect(e).toBeInstanceOf(QimgError);
        expect(q.status).toBe(1);
        return;
      }
      const human = formatCheckHuman(r);
      expect(human.stdout).toBe(q.stdout);
      if (f.format === "qcow2") expect(human.stderr).toBe(q.stderr);
      expect(formatCheckJson(r)).toBe(qj.stdout);
      expect(r.exitCode).toBe(q.status);
    });
  }
});
