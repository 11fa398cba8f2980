import { tilingProblems, type FieldTable, type StructDef } from "@qimg/structs";
import { describe, expect, it } from "vitest";
import * as messages from "./messages.js";
import { RequestHeader, ServerGreeting } from "./messages.js";
import { NBD_INIT_MAGIC, NBD_OPTS_MAGIC, NBD_REQUEST_MAGIC } from "./constants.js";

/** Every structure messages.ts exports, with the codec typed loosely so one test body fits all. */
const ALL: readonly StructDef<FieldTable>[] = Object.values(messages);

describe("NBD wire structures", () => {
  it.each(ALL.map((d) => [d.name, d] as const))("%s: fields tile the size exactly", (_n, def) => {
    expect(tilingProblems(def)).toEqual([]);
  });

  it.each(ALL.map((d) => [d.name, d] as const))("%s: encode(decode(b)) === b", (_n, def) => {
    const b = new Uint8Array(def.size);
    for (let i = 0; i < b.length; i++) b[i] = (i * 37 + 11) & 0xff;
    // u64 fields (sizes, offsets) must stay <= 2^53 - 1: clear their top bytes.
    for (const f of Object.values(def.fields))
      if (f.type === "u64") b.fill(0, f.offset, f.offset + 2);
    expect(def.encode(def.decode(b))).toEqual(b);
  });

  it("the greeting is 'NBDMAGIC' 'IHAVEOPT' and big-endian flags, as the protocol fixes it", () => {
    const g = ServerGreeting.encode({
      initMagic: NBD_INIT_MAGIC,
      optsMagic: NBD_OPTS_MAGIC,
      handshakeFlags: 3,
    });
    expect(new TextDecoder().decode(g.subarray(0, 16))).toBe("NBDMAGICIHAVEOPT");
    expect(Array.from(g.subarray(16))).toEqual([0, 3]);
  });

  it("a request keeps offsets past 2^53 as bigint (untrusted clients send anything)", () => {
    const r = RequestHeader.encode({
      magic: NBD_REQUEST_MAGIC,
      flags: 1,
      type: 0,
      cookie: 0xffff_ffff_ffff_ffffn,
      offset: 0xffff_ffff_ffff_fe00n,
      length: 512,
    });
    expect(Array.from(r.subarray(0, 4))).toEqual([0x25, 0x60, 0x95, 0x13]);
    const d = RequestHeader.decode(r);
    expect(d.offset).toBe(0xffff_ffff_ffff_fe00n);
    expect(d.cookie).toBe(0xffff_ffff_ffff_ffffn);
  });
});
