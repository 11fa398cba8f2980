/** Header updates of a read-write open. */
import { encodeHeaderArea } from "./spec/header-area.js";
import type { Qcow2Header } from "./spec/header.js";
import { Meta, checkOverlap } from "./overlap.js";
import type { Qcow2State } from "./state.js";

/** Rewrite the whole header area (header, extensions, backing name) in one write, then sync. */
export async function rewriteHeader(s: Qcow2State, changes: Partial<Qcow2Header>): Promise<void> {
  const next: Qcow2Header = { ...s.hdr, ...changes };
  const area = encodeHeaderArea(
    next,
    s.extensions.map((e) => ({ type: e.type, data: e.data })),
    s.backingFilename,
  );
  if (s.w) await checkOverlap(s, 0, area.bytes.byteLength, Meta.header);
  await s.backend.write(0, area.bytes);
  await s.backend.flush();
  s.hdr = area.header;
}
