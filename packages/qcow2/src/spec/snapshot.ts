import { FormatError, defineStruct, hex, readU64, viewOf } from "@qimg/structs";

/** Fixed part of a snapshot table entry: 40 bytes, then extra data, id, name, padding to 8. */
export const SNAPSHOT_FIELDS = {
  l1TableOffset: {
    offset: 0,
    type: "u64",
    unit: "bytes",
    doc: "u64: offset of the snapshot's L1 table",
  },
  l1Size: {
    offset: 8,
    type: "u32",
    unit: "entries",
    doc: "u32: entries in the snapshot's L1 table",
  },
  idStrSize: { offset: 12, type: "u16", unit: "bytes", doc: "u16: length of the unique ID string" },
  nameSize: { offset: 14, type: "u16", unit: "bytes", doc: "u16: length of the name" },
  dateSec: {
    offset: 16,
    type: "u32",
    unit: "seconds",
    doc: "u32: creation time, seconds since the epoch",
  },
  dateNsec: {
    offset: 20,
    type: "u32",
    unit: "nanoseconds",
    doc: "u32: creation time, nanosecond part",
  },
  vmClockNsec: {
    offset: 24,
    type: "bits64",
    unit: "nanoseconds",
    doc: "u64: guest clock when taken (any 64-bit value; not an offset, so kept as bigint)",
  },
  vmStateSize: {
    offset: 32,
    type: "u32",
    unit: "bytes",
    doc: "u32: VM state size (32-bit; see extra data)",
  },
  extraDataSize: {
    offset: 36,
    type: "u32",
    unit: "bytes",
    doc: "u32: size of the extra data that follows",
  },
} as const;
export const SNAPSHOT_FIXED_SIZE = 40;
/** The fixed 40-byte part of a snapshot table entry (id, name and extra data follow it). */
export const SnapshotFixed = defineStruct(
  "qcow2 snapshot entry",
  "big",
  SNAPSHOT_FIXED_SIZE,
  SNAPSHOT_FIELDS,
);

/** Extra data fields (v3 writes at least 16 bytes; 24 with icount). */
export const SNAPSHOT_EXTRA_FIELDS = {
  vmStateSizeLarge: { offset: 0, type: "u64", unit: "bytes", doc: "u64: VM state size" },
  diskSize: { offset: 8, type: "u64", unit: "bytes", doc: "u64: virtual disk size when taken" },
  icount: { offset: 16, type: "bits64", doc: "u64: instruction count, or -1 when not recorded" },
} as const;
/** The known fields of a snapshot entry's extra data. */
export const SnapshotExtra = defineStruct(
  "qcow2 snapshot extra data",
  "big",
  24,
  SNAPSHOT_EXTRA_FIELDS,
);

/** Most entries QEMU loads from a snapshot's L1 table (32 MiB of table). */
export const MAX_SNAPSHOT_L1_ENTRIES = (32 * 1024 * 1024) / 8;

/** QEMU's limit on one entry's extra data. */
export const MAX_SNAPSHOT_EXTRA = 1024;

/** One snapshot table entry, decoded. */
export interface SnapshotEntry {
  /** File offset of the snapshot's L1 table. */
  readonly l1TableOffset: number;
  /** Entries of that L1 table. */
  readonly l1Size: number;
  /** The snapshot's unique id string. */
  readonly id: string;
  /** The snapshot's name. */
  readonly name: string;
  /** Wall-clock time it was taken: seconds since the epoch. */
  readonly dateSec: number;
  /** The nanoseconds part of that time. */
  readonly dateNsec: number;
  /** Guest clock in nanoseconds; any u64 (QEMU reads values past 2^53), so a bigint. */
  readonly vmClockNsec: bigint;
  /** Bytes of saved VM state (0 for a disk-only snapshot). */
  readonly vmStateSize: number;
  /** Virtual disk size when taken, from the extra data; undefined when it is too short. */
  readonly diskSize: number | undefined;
  /** Instruction count from the extra data; undefined when absent. */
  readonly icount: bigint | undefined;
  /** The extra data verbatim (unknown trailing fields round-trip). */
  readonly extraData: Uint8Array;
  /** Offset of this entry in the file. */
  readonly offset: number;
}

const dec = new TextDecoder();
const enc = new TextEncoder();

/** Options of {@link decodeSnapshotTable}. */
export interface DecodeSnapshotTableOptions {
  /**
   * `bytes` ends where the file ends: what lies past it reads as zeros (as QEMU reads past the
   * end of a file), up to `maxBytes` of table. Without it, an entry past `bytes` is an error.
   */
  readonly zeroPastEnd?: boolean;
  /** The largest table accepted when `zeroPastEnd` (QEMU's 64 MiB). */
  readonly maxBytes?: number;
}

/** `len` bytes of `bytes` from `start`, zeros where `bytes` ends (a copy only then). */
function window(bytes: Uint8Array, start: number, len: number): Uint8Array {
  if (start + len <= bytes.byteLength) return bytes.subarray(start, start + len);
  const out = new Uint8Array(len);
  if (start < bytes.byteLength) out.set(bytes.subarray(start));
  return out;
}

/**
 * Decode `count` entries from the snapshot table bytes (which start at file offset
 * `tableOffset`). Every length is checked against the bytes available (or, with
 * `zeroPastEnd`, against `maxBytes`, reading zeros past the end of `bytes`).
 *
 * Like QEMU, a version 3 entry whose extra data is shorter than 16 bytes (no disk size) is
 * decoded, not refused (qemu-img check reports it as incomplete), and so is an entry whose L1
 * table is larger than QEMU's 32 MiB (only loading that snapshot fails; see
 * {@link MAX_SNAPSHOT_L1_ENTRIES}).
 */
export function decodeSnapshotTable(
  bytes: Uint8Array,
  count: number,
  tableOffset: number,
  version: 2 | 3,
  options: DecodeSnapshotTableOptions = {},
): SnapshotEntry[] {
  const out: SnapshotEntry[] = [];
  const limit =
    options.zeroPastEnd === true ? (options.maxBytes ?? 64 * 1024 * 1024) : bytes.byteLength;
  let pos = 0;
  for (let i = 0; i < count; i++) {
    const at = tableOffset + pos;
    if (pos + SNAPSHOT_FIXED_SIZE > limit) {
      throw new FormatError(
        `qcow2 snapshot entry ${i} at ${hex(at)} runs past the snapshot table`,
        { offset: at },
      );
    }
    const f = SnapshotFixed.decode(window(bytes, pos, SNAPSHOT_FIXED_SIZE), 0, at);
    if (f.extraDataSize > MAX_SNAPSHOT_EXTRA) {
      throw new FormatError(
        `qcow2 snapshot entry ${i} at ${hex(at)}: extra data size ${f.extraDataSize} is larger than ${MAX_SNAPSHOT_EXTRA}`,
        { offset: at + 36 },
      );
    }
    const extraStart = pos + SNAPSHOT_FIXED_SIZE;
    const idStart = extraStart + f.extraDataSize;
    const nameStart = idStart + f.idStrSize;
    const end = nameStart + f.nameSize;
    if (end > limit) {
      throw new FormatError(
        `qcow2 snapshot entry ${i} at ${hex(at)} runs past the snapshot table`,
        { offset: at },
      );
    }
    const extra = window(bytes, extraStart, f.extraDataSize).slice();
    const ev = viewOf(extra);
    const large =
      extra.byteLength >= 8 ? readU64(ev, 0, false, "snapshot VM state size") : f.vmStateSize;
    const diskSize =
      extra.byteLength >= 16 ? readU64(ev, 8, false, "snapshot disk size") : undefined;
    const icount = extra.byteLength >= 24 ? ev.getBigUint64(16, false) : undefined;
    out.push({
      l1TableOffset: f.l1TableOffset,
      l1Size: f.l1Size,
      id: dec.decode(window(bytes, idStart, f.idStrSize)),
      name: dec.decode(window(bytes, nameStart, f.nameSize)),
      dateSec: f.dateSec,
      dateNsec: f.dateNsec,
      vmClockNsec: f.vmClockNsec,
      vmStateSize: large,
      diskSize,
      icount,
      extraData: extra,
      offset: at,
    });
    pos = Math.ceil(end / 8) * 8;
  }
  return out;
}

/** Encode a snapshot table (entries padded to 8 bytes). */
export function encodeSnapshotTable(entries: readonly Omit<SnapshotEntry, "offset">[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const e of entries) {
    const id = enc.encode(e.id);
    const name = enc.encode(e.name);
    const size =
      Math.ceil(
        (SNAPSHOT_FIXED_SIZE + e.extraData.byteLength + id.byteLength + name.byteLength) / 8,
      ) * 8;
    const b = new Uint8Array(size);
    SnapshotFixed.encode(
      {
        l1TableOffset: e.l1TableOffset,
        l1Size: e.l1Size,
        idStrSize: id.byteLength,
        nameSize: name.byteLength,
        dateSec: e.dateSec,
        dateNsec: e.dateNsec,
        vmClockNsec: e.vmClockNsec,
        vmStateSize: e.vmStateSize > 0xffff_ffff ? 0 : e.vmStateSize,
        extraDataSize: e.extraData.byteLength,
      },
      b,
    );
    b.set(e.extraData, SNAPSHOT_FIXED_SIZE);
    b.set(id, SNAPSHOT_FIXED_SIZE + e.extraData.byteLength);
    b.set(name, SNAPSHOT_FIXED_SIZE + e.extraData.byteLength + id.byteLength);
    parts.push(b);
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.byteLength;
  }
  return out;
}
