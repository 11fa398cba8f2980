/**
 * qemu-img's `-l` (convert, measure): an internal snapshot to read instead of the image's
 * active state, and the read-only view of the image at that snapshot.
 */
import { Qcow2Image, type SnapshotSelector } from "@qimg/qcow2";
import type { DiskImage } from "../drivers.js";
import { CliError, messageOf } from "../errors.js";

/** qemu-img's refusal of a `-l` it cannot parse: two lines, joined with ". " in the message. */
export class SnapshotParamError extends CliError {
  /** The two lines as qemu-img prints them (measure prints them so). */
  readonly lines: readonly string[];

  constructor(lines: readonly string[]) {
    super(lines.join(". "));
    this.lines = lines;
  }
}

/**
 * Parse `-l`'s text: `snapshot.id=ID[,snapshot.name=NAME]` or `snapshot.name=NAME` give a
 * selector; any other text is an ID or a name, as it is (ID first, as qemu-img). Another key
 * after `snapshot.` is refused with qemu-img's two lines, joined as the CLI prints them.
 * qemu-img parses `-l` with the options, so callers do this before opening anything.
 */
export function parseSnapshotParam(text: string): SnapshotSelector | string {
  if (!text.startsWith("snapshot.")) return text;
  let id: string | undefined;
  let name: string | undefined;
  for (const part of text.split(",")) {
    const eq = part.indexOf("=");
    const key = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? "" : part.slice(eq + 1);
    if (key === "snapshot.id") id = value;
    else if (key === "snapshot.name") name = value;
    else
      throw new SnapshotParamError([
        `Invalid parameter '${key}'`,
        `Failed in parsing snapshot param '${text}'`,
      ]);
  }
  return { ...(id !== undefined ? { id } : {}), ...(name !== undefined ? { name } : {}) };
}

/**
 * The snapshot's read-only view of `image`, at the image's current size (as qemu-img 7.2
 * reads it), with qemu-img's "Failed to load snapshot: ..." errors: only qcow2 has internal
 * snapshots.
 */
export async function loadSnapshotView(
  image: DiskImage,
  selector: SnapshotSelector | string,
): Promise<DiskImage> {
  if (!(image instanceof Qcow2Image)) {
    throw new CliError(
      `Failed to load snapshot: Block format '${image.format}' used by device '' does not support temporarily loading internal snapshots`,
    );
  }
  try {
    return await image.openSnapshot(selector, { size: "image" });
  } catch (e) {
    if (e instanceof Error && e.message.startsWith("Can't find")) {
      throw new CliError("Failed to load snapshot: Can't find snapshot", { cause: e });
    }
    throw new CliError(`Failed to load snapshot: ${messageOf(e, "")}`, { cause: e });
  }
}
