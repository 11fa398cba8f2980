/**
 * The repair QEMU runs when it opens a dirty qcow2 image read-write (`qimg io` as qemu-io,
 * `qimg amend` as qemu-img amend): a full check that fixes what it finds, before the open.
 */
import { checkImage } from "@qimg/check";
import { FileBackend } from "@qimg/io/node";
import type { CliContext } from "../context.js";
import { probeBackend } from "../open.js";

/**
 * Repair `file` before a read-write open when it is a qcow2 image (version 3) whose dirty bit
 * is set (lazy refcounts, not closed cleanly), as QEMU's open does: the check of @qimg/check
 * with repair=all, its lines ("ERROR cluster 5 refcount=0 reference=1", "Rebuilding refcount
 * structure", "Repairing cluster ...") on stderr and no summary. `format` is the `-f` given,
 * if any: only qcow2 (or a probed format) is looked at. Anything else, and any failure here,
 * is left to the open proper, which reports it (and rebuilds a dirty image's refcounts
 * itself).
 */
export async function repairDirtyQcow2(
  ctx: CliContext,
  file: string,
  format: string | undefined,
): Promise<void> {
  if (format !== undefined && format !== "qcow2") return;
  let backend: FileBackend;
  try {
    backend = await FileBackend.open(file, { readOnly: false });
  } catch {
    return; // the open proper reports it
  }
  try {
    if ((await probeBackend(backend)) !== "qcow2") return;
    const head = new Uint8Array(80);
    if ((await backend.size()) < head.length) return;
    await backend.read(0, head);
    const view = new DataView(head.buffer);
    // Version 3 and incompatible feature bit 0 (dirty).
    if (view.getUint32(4, false) < 3 || (view.getUint8(79) & 1) === 0) return;
    const result = await checkImage(backend, "qcow2", { repair: "all", filename: file });
    ctx.stderr(result.messages.map((m) => `${m.text}\n`).join(""));
  } catch {
    // Left to the open, which rebuilds the refcounts of a dirty image itself.
  } finally {
    await backend.close().catch(() => undefined);
  }
}
