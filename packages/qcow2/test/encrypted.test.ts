/**
 * The LUKS header codec and `readEncryptedQcow2Info` on images real qemu-img encrypted:
 * fields tile the header, decode/encode round-trips the bytes qemu-img wrote, and the facts
 * equal `qemu-img info --output=json`'s `encrypt` object. A plain open still refuses them.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { tilingProblems } from "@qimg/structs";
import { FileBackend } from "@qimg/io/node";
import { requireQemu } from "@qimg/fixtures";
import {
  LUKS_HEADER_SIZE,
  decodeLuksHeader,
  encodeLuksHeader,
  openQcow2,
  readEncryptedQcow2Info,
} from "../src/index.js";
import { LuksHeaderFields, LuksKeySlot } from "../src/spec/luks.js";
import { qemuImg, scratchDirs } from "./twins.js";

const haveQemu = requireQemu();
const newDir = scratchDirs("qimg-encrypted-");

/** A 1 MiB qcow2 image encrypted by qemu-img with the secret `s` (passphrase "x"). */
function createEncrypted(file: string, options: string): void {
  const r = qemuImg([
    ...["create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=x"],
    ...["-o", options, file, "1M"],
  ]);
  expect(r.code, r.stderr).toBe(0);
}

describe("LUKS header codec", () => {
  it("fields tile the fixed header and a key slot", () => {
    expect(tilingProblems(LuksHeaderFields)).toEqual([]);
    expect(tilingProblems(LuksKeySlot)).toEqual([]);
    expect(LUKS_HEADER_SIZE).toBe(592);
  });

  it("refuses bytes that are not a LUKS header", () => {
    expect(() => decodeLuksHeader(new Uint8Array(LUKS_HEADER_SIZE))).toThrow(/not in LUKS format/);
    expect(() => decodeLuksHeader(new Uint8Array(10))).toThrow(/needs 592 bytes/);
  });
});

describe.skipIf(!haveQemu)("encrypted images qemu-img made", () => {
  it("LUKS: round trip of the header bytes, facts equal qemu-img info's", async () => {
    const dir = newDir();
    const file = path.join(dir, "l.qcow2");
    createEncrypted(
      file,
      "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    );
    const backend = await FileBackend.open(file, { readOnly: true });
    try {
      const got = await readEncryptedQcow2Info(backend);
      expect(got).toBeDefined();
      const q = JSON.parse(qemuImg(["info", "--output=json", file]).stdout) as {
        "format-specific": { data: { encrypt: Record<string, unknown> } };
      };
      const e = q["format-specific"].data.encrypt;
      const mine = got!.encrypt;
      expect(mine.format).toBe("luks");
      if (mine.format !== "luks") return;
      expect({
        "ivgen-alg": mine.ivgenAlg,
        "hash-alg": mine.hashAlg,
        "cipher-alg": mine.cipherAlg,
        uuid: mine.uuid,
        "ivgen-hash-alg": mine.ivgenHashAlg,
        format: "luks",
        "cipher-mode": mine.cipherMode,
        slots: mine.slots.map((s) => ({
          active: s.active,
          ...(s.iters !== undefined ? { iters: s.iters } : {}),
          "key-offset": s.keyOffset,
          ...(s.stripes !== undefined ? { stripes: s.stripes } : {}),
        })),
        "payload-offset": mine.payloadOffset,
        "master-key-iters": mine.masterKeyIters,
      }).toEqual(e);
      expect(got!.info.encrypted).toBe(true);
      // The header bytes where the extension points round-trip.
      const bytes = fs.readFileSync(file);
      const at = bytes.indexOf(Buffer.from("LUKS\xba\xbe", "latin1"));
      const raw = new Uint8Array(bytes.subarray(at, at + LUKS_HEADER_SIZE));
      expect(Buffer.from(encodeLuksHeader(decodeLuksHeader(raw))).equals(Buffer.from(raw))).toBe(
        true,
      );
      // Opening for data stays refused.
      await expect(openQcow2(backend)).rejects.toThrow(/encryption is not supported/);
    } finally {
      await backend.close();
    }
  });

  it("AES: format aes; a plain image gives undefined", async () => {
    const dir = newDir();
    const file = path.join(dir, "a.qcow2");
    createEncrypted(file, "encrypt.format=aes,encrypt.key-secret=s");
    const plain = path.join(dir, "p.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", plain, "1M"]).code).toBe(0);
    for (const [f, want] of [
      [file, { format: "aes" }],
      [plain, undefined],
    ] as const) {
      const b = await FileBackend.open(f, { readOnly: true });
      try {
        const got = await readEncryptedQcow2Info(b);
        expect(got?.encrypt).toEqual(want);
      } finally {
        await b.close();
      }
    }
  });
});
