/**
 * The snapshot table as `qemu-img check -r all` reads it when a normal read fails
 * (qcow2_check_read_snapshot_table with repair): more than 65536 snapshots are cut to 65536,
 * an entry's extra data past 1024 bytes is dropped (its first 1024 bytes are kept), and the
 * entries that would end past the 64 MiB table limit are dropped with every entry after them.
 * The header's snapshot count is updated at once when entries are dropped (those entries'
 * clusters then leak, which the refcount pass repairs); the table itself is rewritten after
 * the refcount pass (qcow2.ts).
 */
import type { BlockBackend } from "@qimg/io";
import { MAX_SNAPSHOTS, SnapshotFixed, writeHeaderFields } from "@qimg/qcow2";
import type { SnapshotEntry } from "@qimg/qcow2";
import type { CheckMessageKind } from "./result.js";
import type { Layout } from "./qcow2-pass.js";

/** QEMU's limit on the snapshot table's length (QCOW_MAX_SNAPSHOTS_SIZE). */
const MAX_TABLE_BYTES = 64 * 1024 * 1024;
/** QEMU's limit on one entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA). */
const MAX_SNAPSHOT_EXTRA = 1024;
/** The furthest QEMU reads into the table (an int). */
const INT_MAX = 2 ** 31 - 1;
const CHUNK = 1024 * 1024;

/** Reads the file in 1 MiB chunks; zeros past its end (as QEMU reads past the end of a file). */
class ChunkReader {
  private at = -1;
  private chunk = new Uint8Array(CHUNK);
  constructor(
    private readonly backend: BlockBackend,
    private readonly fileSize: number,
  ) {}

  async read(offset: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      if (pos >= this.fileSize) break;
      const base = Math.floor(pos / CHUNK) * CHUNK;
      if (base !== this.at) {
        this.chunk.fill(0);
        const n = Math.min(CHUNK, this.fileSize - base);
        await this.backend.read(base, this.chunk.subarray(0, n));
        this.at = base;
      }
      const n = Math.min(length - done, base + CHUNK - pos);
      out.set(this.chunk.subarray(pos - base, pos - base + n), done);
      done += n;
    }
    return out;
  }
}

const utf8 = new TextDecoder();

/** A C string: the bytes up to the first NUL (QEMU keeps IDs and names as C strings). */
function cString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return utf8.decode(nul < 0 ? bytes : bytes.subarray(0, nul));
}

/** What the repairing read found. */
export interface RepairedSnapshotTable {
  /** The layout with the entries kept, their on-disk extent and the new snapshot count. */
  readonly layout: Layout;
  /** Snapshots dropped (over 65536, or past the 64 MiB limit); already fixed on disk. */
  readonly reduced: number;
  /** Entries whose extra data was cut to 1024 bytes (fixed when the table is rewritten). */
  readonly dropped: number;
}

/**
 * Read the snapshot table of `layout` as `qemu-img check -r all` does, printing QEMU's
 * "Discarding ..." lines, and store the reduced snapshot count in the header (synced).
 */
export async function readSnapshotTableRepairing(
  backend: BlockBackend,
  layout: Layout,
  log: (kind: CheckMessageKind, text: string) => void,
): Promise<RepairedSnapshotTable> {
  const h = layout.header;
  let count = h.nbSnapshots;
  let reduced = 0;
  let dropped = 0;
  if (count > MAX_SNAPSHOTS) {
    log("repair", `Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  const reader = new ChunkReader(backend, await backend.size());
  const start = h.snapshotsOffset;
  const snapshots: SnapshotEntry[] = [];
  let offset = start;
  let tableLength = 0;
  for (let i = 0; i < count; i++) {
    const before = offset;
    tableLength = Math.ceil(tableLength / 8) * 8;
    offset = Math.ceil(offset / 8) * 8;
    const at = offset;
    const f = SnapshotFixed.decode(await reader.read(offset, 40), 0, offset);
    offset += 40;
    let extraSize = f.extraDataSize;
    if (extraSize > MAX_SNAPSHOT_EXTRA) {
      log(
        "repair",
        `Discarding too much extra metadata in snapshot table entry ${i} (${extraSize} > ${MAX_SNAPSHOT_EXTRA})`,
      );
      dropped++;
      extraSize = MAX_SNAPSHOT_EXTRA;
    }
    const extra = await reader.read(offset, extraSize);
    offset += f.extraDataSize;
    const id = cString(await reader.read(offset, f.idStrSize));
    offset += f.idStrSize;
    const name = cString(await reader.read(offset, f.nameSize));
    offset += f.nameSize;
    tableLength += 40 + extraSize + f.idStrSize + f.nameSize;
    if (tableLength > MAX_TABLE_BYTES || offset - start > INT_MAX) {
      log("repair", `Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
      reduced += count - i;
      count = i;
      offset = before;
      break;
    }
    const dv = new DataView(extra.buffer, extra.byteOffset, extra.byteLength);
    snapshots.push({
      l1TableOffset: f.l1TableOffset,
      l1Size: f.l1Size,
      id,
      name,
      dateSec: f.dateSec,
      dateNsec: f.dateNsec,
      vmClockNsec: f.vmClockNsec,
      vmStateSize: extraSize >= 8 ? Number(dv.getBigUint64(0, false)) : f.vmStateSize,
      diskSize: extraSize >= 16 ? Number(dv.getBigUint64(8, false)) : undefined,
      icount: extraSize >= 24 ? dv.getBigUint64(16, false) : undefined,
      extraData: extra,
      offset: at,
    });
  }
  let header = h;
  if (reduced > 0) {
    // QEMU writes the 4-byte count alone, synced, before the refcount pass.
    header = await writeHeaderFields(backend, h, { nbSnapshots: count });
  }
  return {
    layout: {
      ...layout,
      header,
      snapshots,
      snapshotsSize: offset - start,
      snapshotTableError: undefined,
    },
    reduced,
    dropped,
  };
}
