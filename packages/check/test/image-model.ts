/**
 * An independent, deliberately simple model of qcow2 and QED files for the repair-never-worse
 * suite: parse the metadata from raw bytes (no qimg code), decide which guest clusters have a
 * mapping that is beyond doubt, read those clusters' guest bytes, and mutate metadata.
 *
 * "Valid" (conservative): a guest cluster of the active L1 table whose L1 entry is 0, or points
 * (aligned, reserved bits clear, past the header, wholly inside the file) at an L2 table
 * cluster that nothing but L1 entries points at; and whose L2 entry is unallocated, a zero
 * cluster, a data cluster (aligned, wholly inside the file, pointed at by nothing but L2
 * entries), or a zlib-compressed cluster (inside the file, its host clusters pointed at by
 * nothing but compressed entries, inflating to exactly one cluster). Anything else — a
 * mapping through an entry with reserved bits, a host cluster that metadata (header, L1/L2
 * tables, refcount table and blocks, snapshot table) also claims, a v2 entry with the zero
 * flag — is not compared. Stored refcounts are not part of it (a repair must keep a mapped
 * cluster's data whatever its refcount says).
 */
import { inflateRawSync } from "node:zlib";

const TWO_32 = 0x1_0000_0000;

export type Format = "qcow2" | "qed";

/** One guest cluster whose mapping is valid, with its guest bytes (`undefined` = zeros). */
export interface ValidCluster {
  readonly index: number;
  readonly bytes: Uint8Array | undefined;
}

/** Header facts a repair must not change (plus what it may). */
export type HeaderFacts = Record<string, string | number>;

/** What the model saw in one image. */
export interface Model {
  readonly format: Format;
  readonly clusterSize: number;
  readonly virtualSize: number;
  readonly valid: ValidCluster[];
  /** Guest clusters in the image. */
  readonly guestClusters: number;
  readonly header: HeaderFacts;
}

const be64 = (b: Uint8Array, o: number): number => {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return v.getUint32(o, false) * TWO_32 + v.getUint32(o + 4, false);
};
const be32 = (b: Uint8Array, o: number): number =>
  new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(o, false);
const be16 = (b: Uint8Array, o: number): number =>
  new DataView(b.buffer, b.byteOffset, b.byteLength).getUint16(o, false);
const le64 = (b: Uint8Array, o: number): number => {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return v.getUint32(o + 4, true) * TWO_32 + v.getUint32(o, true);
};
const le32 = (b: Uint8Array, o: number): number =>
  new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(o, true);

/** The two 32-bit words of a big-endian u64 at `o` (0 past the end). */
function words(b: Uint8Array, o: number): [number, number] {
  if (o + 8 > b.byteLength) return [0, 0];
  return [be32(b, o), be32(b, o + 4)];
}

/**
 * Host-cluster claims: bit 1 metadata, 2 L2 table, 4 data, 8 compressed data, 16 refcount
 * table or block. A mapping through a cluster the refcount structures also claim is not
 * valid: a refcount repair writes refcount blocks, whatever else reads them.
 */
const C_META = 1;
const C_RC = 16;
const C_L2 = 2;
const C_DATA = 4;
const C_COMP = 8;

class Claims {
  readonly map = new Map<number, number>();
  constructor(readonly cs: number) {}
  add(offset: number, size: number, kind: number): void {
    if (size <= 0 || !Number.isSafeInteger(offset + size)) return;
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let c = Math.floor(offset / this.cs); c <= last && c - offset / this.cs < 1 << 20; c++) {
      this.map.set(c, (this.map.get(c) ?? 0) | kind);
    }
  }
  only(offset: number, size: number, kind: number): boolean {
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let c = Math.floor(offset / this.cs); c <= last; c++) {
      if ((this.map.get(c) ?? 0) & ~kind) return false;
    }
    return true;
  }
}

interface Qcow2Meta {
  cs: number;
  bits: number;
  version: number;
  size: number;
  l1Size: number;
  l1Offset: number;
  rtOffset: number;
  rtClusters: number;
  nbSnapshots: number;
  snOffset: number;
  incompat: number;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  extL2: boolean;
  dataFile: boolean;
  snapshots: { l1Offset: number; l1Size: number }[];
  snTableEnd: number;
}

function qcow2Meta(f: Uint8Array): Qcow2Meta | undefined {
  if (f.byteLength < 72 || be32(f, 0) !== 0x514649fb) return undefined;
  const version = be32(f, 4);
  const bits = be32(f, 20);
  if (bits < 9 || bits > 21) return undefined;
  const cs = 2 ** bits;
  const v3 = version >= 3 && f.byteLength >= 104;
  const incompat = v3 ? be32(f, 76) : 0;
  const m: Qcow2Meta = {
    cs,
    bits,
    version,
    size: be64(f, 24),
    l1Size: be32(f, 36),
    l1Offset: be64(f, 40),
    rtOffset: be64(f, 48),
    rtClusters: be32(f, 56),
    nbSnapshots: be32(f, 60),
    snOffset: be64(f, 64),
    incompat,
    refcountOrder: v3 ? be32(f, 96) : 4,
    headerLength: v3 ? be32(f, 100) : 72,
    compressionType: v3 && be32(f, 100) > 104 ? f[104]! : 0,
    extL2: (incompat & 16) !== 0,
    dataFile: (incompat & 4) !== 0,
    snapshots: [],
    snTableEnd: 0,
  };
  let o = m.snOffset;
  for (let i = 0; i < Math.min(m.nbSnapshots, 1000); i++) {
    if (o + 40 > f.byteLength) break;
    const extra = be32(f, o + 36);
    const idLen = be16(f, o + 12);
    const nameLen = be16(f, o + 14);
    m.snapshots.push({ l1Offset: be64(f, o), l1Size: be32(f, o + 8) });
    o += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
  }
  m.snTableEnd = o;
  return m;
}

function qcow2Facts(f: Uint8Array): HeaderFacts {
  const m = qcow2Meta(f);
  if (m === undefined) return { magic: f.byteLength >= 4 ? be32(f, 0) : -1 };
  const backingOff = be64(f, 8);
  const backingLen = be32(f, 16);
  return {
    magic: be32(f, 0),
    version: m.version,
    clusterBits: m.bits,
    size: m.size,
    crypt: be32(f, 32),
    l1Size: m.l1Size,
    l1Offset: m.l1Offset,
    nbSnapshots: m.nbSnapshots,
    snapshotsOffset: m.snOffset,
    refcountOrder: m.refcountOrder,
    headerLength: m.headerLength,
    compressionType: m.compressionType,
    // Incompatible features except dirty (bit 0) and corrupt (bit 1), which a repair clears.
    incompat: m.incompat & ~3,
    compatible: m.version >= 3 ? be32(f, 84) : 0,
    backing:
      backingLen > 0 && backingOff + backingLen <= f.byteLength
        ? Buffer.from(f.subarray(backingOff, backingOff + backingLen)).toString("latin1")
        : "",
  };
}

/** Decompress a zlib (raw deflate) cluster; undefined unless it inflates to exactly `cs` bytes. */
function inflateCluster(src: Uint8Array, cs: number): Uint8Array | undefined {
  try {
    const out = inflateRawSync(src, { finishFlush: 2 /* Z_SYNC_FLUSH */ });
    if (out.byteLength < cs) return undefined;
    return new Uint8Array(out.buffer, out.byteOffset, cs);
  } catch {
    return undefined;
  }
}

function modelQcow2(f: Uint8Array): Model | undefined {
  const m = qcow2Meta(f);
  if (m === undefined || m.dataFile || m.cs === 0) return undefined;
  const { cs } = m;
  const fileSize = f.byteLength;
  const inFile = (o: number, n: number): boolean => o > 0 && o % cs === 0 && o + n <= fileSize;
  const entryBytes = m.extL2 ? 16 : 8;
  const l2Entries = cs / entryBytes;
  const claims = new Claims(cs);
  claims.add(0, cs, C_META);
  claims.add(m.rtOffset, m.rtClusters * cs, C_RC);
  for (let i = 0; i < m.rtClusters * (cs / 8) && m.rtOffset + i * 8 + 8 <= fileSize; i++) {
    const [hi, lo] = words(f, m.rtOffset + i * 8);
    const off = hi * TWO_32 + ((lo & ~0x1ff) >>> 0);
    if (off !== 0) claims.add(off, cs, C_RC);
  }
  if (m.nbSnapshots > 0) claims.add(m.snOffset, m.snTableEnd - m.snOffset, C_META);
  const tables = [{ l1Offset: m.l1Offset, l1Size: m.l1Size }, ...m.snapshots];
  for (const t of tables) {
    if (t.l1Size > 0x40_0000) continue;
    claims.add(t.l1Offset, t.l1Size * 8, C_META);
  }
  const x = 62 - (m.bits - 8);
  const compressed = (hi: number, lo: number): { off: number; len: number } => {
    const v = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
    const off = Number(v & ((1n << BigInt(x)) - 1n));
    const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(m.bits - 8)) - 1n)) + 1;
    return { off, len: sectors * 512 - (off & 511) };
  };
  // Claims of every L2 table and data cluster, from every L1 table.
  for (const t of tables) {
    if (t.l1Size > 0x40_0000 || !inFile(t.l1Offset, t.l1Size * 8)) continue;
    for (let i = 0; i < t.l1Size; i++) {
      const [hi, lo] = words(f, t.l1Offset + i * 8);
      const l2 = (hi & 0x00ff_ffff) * TWO_32 + ((lo & ~0x1ff) >>> 0);
      if (l2 === 0) continue;
      claims.add(l2, cs, C_L2);
      if (!inFile(l2, cs)) continue;
      for (let j = 0; j < l2Entries; j++) {
        const [ehi, elo] = words(f, l2 + j * entryBytes);
        if ((ehi & 0x4000_0000) !== 0) {
          const d = compressed(ehi & 0x3fff_ffff, elo);
          claims.add(d.off, d.len, C_COMP);
        } else {
          const off = (ehi & 0x00ff_ffff) * TWO_32 + ((elo & ~0x1ff) >>> 0);
          if (off !== 0) claims.add(off, cs, C_DATA);
        }
      }
    }
  }
  const valid: ValidCluster[] = [];
  const guestClusters = Math.ceil(m.size / cs);
  if (
    m.l1Size > 0x40_0000 ||
    !inFile(m.l1Offset, m.l1Size * 8) ||
    !claims.only(m.l1Offset, m.l1Size * 8, C_META)
  ) {
    return {
      format: "qcow2",
      clusterSize: cs,
      virtualSize: m.size,
      valid,
      guestClusters,
      header: qcow2Facts(f),
    };
  }
  const sub = cs / 32;
  for (let g = 0; g < guestClusters; g++) {
    const i = Math.floor(g / l2Entries);
    if (i >= m.l1Size) break;
    const [hi, lo] = words(f, m.l1Offset + i * 8);
    if ((hi | lo) === 0) {
      valid.push({ index: g, bytes: undefined });
      continue;
    }
    if ((hi & 0x7f00_0000) !== 0 || (lo & 0x1ff) !== 0) continue;
    const l2 = (hi & 0x00ff_ffff) * TWO_32 + (lo >>> 0);
    if (!inFile(l2, cs) || !claims.only(l2, cs, C_L2)) continue;
    const eo = l2 + (g % l2Entries) * entryBytes;
    const [ehi, elo] = words(f, eo);
    const [bhi, blo] = m.extL2 ? words(f, eo + 8) : [0, 0];
    if ((ehi & 0x4000_0000) !== 0) {
      if ((ehi & 0x8000_0000) !== 0 || (bhi | blo) !== 0 || m.compressionType !== 0) continue;
      const d = compressed(ehi & 0x3fff_ffff, elo);
      if (d.off < cs || d.off + d.len > fileSize || !claims.only(d.off, d.len, C_COMP)) continue;
      const bytes = inflateCluster(f.subarray(d.off, d.off + d.len), cs);
      if (bytes !== undefined) valid.push({ index: g, bytes });
      continue;
    }
    if ((ehi & 0x3f00_0000) !== 0 || (elo & 0x1fe) !== 0) continue;
    const off = (ehi & 0x00ff_ffff) * TWO_32 + ((elo & ~0x1ff) >>> 0);
    const hostOk = off !== 0 && inFile(off, cs) && claims.only(off, cs, C_DATA);
    if (!m.extL2) {
      const zero = (elo & 1) !== 0;
      if (zero && m.version < 3) continue;
      if (off !== 0 && !hostOk) continue;
      if (zero || off === 0) valid.push({ index: g, bytes: undefined });
      else valid.push({ index: g, bytes: f.slice(off, off + cs) });
      continue;
    }
    const alloc = blo >>> 0;
    const zeros = bhi >>> 0;
    if ((alloc & zeros) !== 0) continue;
    if (alloc !== 0 && !hostOk) continue;
    if (alloc === 0) {
      if (off !== 0 && !hostOk) continue;
      valid.push({ index: g, bytes: undefined });
      continue;
    }
    const bytes = new Uint8Array(cs);
    for (let s = 0; s < 32; s++) {
      if ((alloc >>> s) & 1) bytes.set(f.subarray(off + s * sub, off + (s + 1) * sub), s * sub);
    }
    valid.push({ index: g, bytes });
  }
  return {
    format: "qcow2",
    clusterSize: cs,
    virtualSize: m.size,
    valid,
    guestClusters,
    header: qcow2Facts(f),
  };
}

function qedFacts(f: Uint8Array): HeaderFacts {
  if (f.byteLength < 64) return { magic: -1 };
  return {
    magic: le32(f, 0),
    clusterSize: le32(f, 4),
    tableSize: le32(f, 8),
    headerSize: le32(f, 12),
    // features except need-check (bit 1), which a repair clears
    features: Number(le64(f, 16)) - (le32(f, 16) & 2),
    l1Offset: le64(f, 40),
    imageSize: le64(f, 48),
    backingOffset: le32(f, 56),
    backingSize: le32(f, 60),
  };
}

function modelQed(f: Uint8Array): Model | undefined {
  if (f.byteLength < 64 || le32(f, 0) !== 0x00444551) return undefined;
  const cs = le32(f, 4);
  const ts = le32(f, 8);
  const hs = le32(f, 12);
  if (cs < 4096 || cs > 64 * 1024 * 1024 || (cs & (cs - 1)) !== 0 || ts < 1 || ts > 16)
    return undefined;
  const l1Offset = le64(f, 40);
  const size = le64(f, 48);
  const sectors = Math.ceil(f.byteLength / 512) * 512;
  const fileSize = sectors - (sectors % cs);
  const tb = ts * cs;
  const entries = tb / 8;
  const okOff = (o: number, n: number): boolean =>
    o % cs === 0 && o >= hs * cs && o + n <= fileSize && o + n <= f.byteLength;
  const claims = new Claims(cs);
  claims.add(0, hs * cs, C_META);
  claims.add(l1Offset, tb, C_META);
  const valid: ValidCluster[] = [];
  const guestClusters = Math.ceil(size / cs);
  const facts = qedFacts(f);
  if (!okOff(l1Offset, tb))
    return {
      format: "qed",
      clusterSize: cs,
      virtualSize: size,
      valid,
      guestClusters,
      header: facts,
    };
  for (let i = 0; i < entries; i++) {
    const l2 = le64(f, l1Offset + i * 8);
    if (l2 === 0) continue;
    claims.add(l2, tb, C_L2);
    if (!okOff(l2, tb)) continue;
    for (let j = 0; j < entries; j++) {
      const d = le64(f, l2 + j * 8);
      if (d > 1) claims.add(d, cs, C_DATA);
    }
  }
  // Each host cluster may be claimed once: count the data claims.
  const dataRefs = new Map<number, number>();
  const l2Refs = new Map<number, number>();
  for (let i = 0; i < entries; i++) {
    const l2 = le64(f, l1Offset + i * 8);
    if (l2 === 0) continue;
    l2Refs.set(l2, (l2Refs.get(l2) ?? 0) + 1);
    if (!okOff(l2, tb)) continue;
    for (let j = 0; j < entries; j++) {
      const d = le64(f, l2 + j * 8);
      if (d > 1) dataRefs.set(d, (dataRefs.get(d) ?? 0) + 1);
    }
  }
  for (let g = 0; g < guestClusters; g++) {
    const i = Math.floor(g / entries);
    const l2 = le64(f, l1Offset + i * 8);
    if (l2 === 0) {
      valid.push({ index: g, bytes: undefined });
      continue;
    }
    if (!okOff(l2, tb) || !claims.only(l2, tb, C_L2) || l2Refs.get(l2) !== 1) continue;
    const d = le64(f, l2 + (g % entries) * 8);
    if (d <= 1) {
      valid.push({ index: g, bytes: undefined });
      continue;
    }
    if (!okOff(d, cs) || !claims.only(d, cs, C_DATA) || dataRefs.get(d) !== 1) continue;
    valid.push({ index: g, bytes: f.slice(d, d + cs) });
  }
  return { format: "qed", clusterSize: cs, virtualSize: size, valid, guestClusters, header: facts };
}

/** Model an image file's bytes (undefined when the header is not one the model understands). */
export function modelImage(format: Format, bytes: Uint8Array): Model | undefined {
  return format === "qcow2" ? modelQcow2(bytes) : modelQed(bytes);
}

/** Header facts of a file (compare before/after a repair). */
export function headerFacts(format: Format, bytes: Uint8Array): HeaderFacts {
  return format === "qcow2" ? qcow2Facts(bytes) : qedFacts(bytes);
}

/**
 * The first valid cluster whose bytes differ in `raw` (the guest disk after the repair, as
 * qemu-img reads it), or undefined when all agree.
 */
export function firstChangedCluster(model: Model, raw: Uint8Array): string | undefined {
  const cs = model.clusterSize;
  for (const c of model.valid) {
    const start = c.index * cs;
    const end = Math.min(start + cs, model.virtualSize);
    for (let k = start; k < end; k++) {
      const want = c.bytes === undefined ? 0 : c.bytes[k - start]!;
      if (raw[k] !== want) {
        return `guest cluster ${c.index} (guest offset 0x${start.toString(16)}) byte 0x${k.toString(16)}: was 0x${want.toString(16)}, now 0x${(raw[k] ?? -1).toString(16)}`;
      }
    }
  }
  return undefined;
}

/**
 * The guest disk as the model reads it: the bytes of every valid cluster, zeros elsewhere
 * (a cluster the model cannot read validly reads as 0xee, so it never matches by chance).
 */
export function readGuest(model: Model): Uint8Array {
  const cs = model.clusterSize;
  const out = new Uint8Array(model.virtualSize).fill(0xee);
  for (const c of model.valid) {
    const start = c.index * cs;
    const end = Math.min(start + cs, model.virtualSize);
    if (c.bytes === undefined) out.fill(0, start, end);
    else out.set(c.bytes.subarray(0, end - start), start);
  }
  return out;
}

// ------------------------------------------------------------------ mutations

/** Where the metadata of a file is, for drawing mutations. */
interface Targets {
  readonly cs: number;
  /** Byte offsets of 8-byte table entries, by kind. */
  readonly l1: number[];
  readonly l2: number[];
  readonly reftable: number[];
  readonly refblock: { offset: number; bits: number; entries: number }[];
  readonly snapshot: number[];
  /** Cluster offsets of metadata structures (to point entries at). */
  readonly metaOffsets: number[];
  readonly dataOffsets: number[];
}

function qcow2Targets(f: Uint8Array): Targets | undefined {
  const m = qcow2Meta(f);
  if (m === undefined) return undefined;
  const cs = m.cs;
  const eb = m.extL2 ? 16 : 8;
  const t: Targets = {
    cs,
    l1: [],
    l2: [],
    reftable: [],
    refblock: [],
    snapshot: [],
    metaOffsets: [0, m.l1Offset, m.rtOffset],
    dataOffsets: [],
  };
  const tables = [{ l1Offset: m.l1Offset, l1Size: m.l1Size }, ...m.snapshots];
  for (const tb of tables) {
    if (tb.l1Offset + tb.l1Size * 8 > f.byteLength) continue;
    t.metaOffsets.push(tb.l1Offset);
    for (let i = 0; i < tb.l1Size; i++) {
      const o = tb.l1Offset + i * 8;
      t.l1.push(o);
      const [hi, lo] = words(f, o);
      const l2 = (hi & 0x00ff_ffff) * TWO_32 + ((lo & ~0x1ff) >>> 0);
      if (l2 === 0 || l2 + cs > f.byteLength) continue;
      t.metaOffsets.push(l2);
      for (let j = 0; j < cs / eb; j++) {
        const e = l2 + j * eb;
        const [ehi, elo] = words(f, e);
        if ((ehi | elo) !== 0 || j % 7 === 0) t.l2.push(e);
        const d = (ehi & 0x00ff_ffff) * TWO_32 + ((elo & ~0x1ff) >>> 0);
        if ((ehi & 0x4000_0000) === 0 && d !== 0) t.dataOffsets.push(d);
      }
    }
  }
  for (let i = 0; i < Math.min(m.rtClusters * (cs / 8), 4096); i++) {
    const o = m.rtOffset + i * 8;
    if (o + 8 > f.byteLength) break;
    const [hi, lo] = words(f, o);
    const off = hi * TWO_32 + ((lo & ~0x1ff) >>> 0);
    if (off === 0 && i > 2) continue;
    t.reftable.push(o);
    if (off !== 0 && off + cs <= f.byteLength) {
      t.metaOffsets.push(off);
      t.refblock.push({
        offset: off,
        bits: 2 ** m.refcountOrder,
        entries: (cs * 8) / 2 ** m.refcountOrder,
      });
    }
  }
  let o = m.snOffset;
  for (let i = 0; i < m.snapshots.length; i++) {
    t.snapshot.push(o);
    const extra = be32(f, o + 36);
    o += Math.ceil((40 + extra + be16(f, o + 12) + be16(f, o + 14)) / 8) * 8;
  }
  if (m.nbSnapshots > 0) t.metaOffsets.push(m.snOffset);
  return t;
}

function qedTargets(f: Uint8Array): Targets | undefined {
  if (f.byteLength < 64 || le32(f, 0) !== 0x00444551) return undefined;
  const cs = le32(f, 4);
  const tb = le32(f, 8) * cs;
  const l1 = le64(f, 40);
  const t: Targets = {
    cs,
    l1: [],
    l2: [],
    reftable: [],
    refblock: [],
    snapshot: [],
    metaOffsets: [0, l1],
    dataOffsets: [],
  };
  if (l1 + tb > f.byteLength) return t;
  for (let i = 0; i < tb / 8; i++) {
    const o = l1 + i * 8;
    const l2 = le64(f, o);
    if (l2 !== 0 || i < 4) t.l1.push(o);
    if (l2 === 0 || l2 + tb > f.byteLength) continue;
    t.metaOffsets.push(l2);
    for (let j = 0; j < tb / 8; j++) {
      const e = l2 + j * 8;
      const d = le64(f, e);
      if (d !== 0 || j % 11 === 0) t.l2.push(e);
      if (d > 1) t.dataOffsets.push(d);
    }
  }
  return t;
}

const pick = <T>(rnd: () => number, a: readonly T[]): T => a[Math.floor(rnd() * a.length)]!;

function putBE64(f: Uint8Array, o: number, v: bigint): void {
  new DataView(f.buffer, f.byteOffset, f.byteLength).setBigUint64(o, BigInt.asUintN(64, v), false);
}
function getBE64(f: Uint8Array, o: number): bigint {
  return new DataView(f.buffer, f.byteOffset, f.byteLength).getBigUint64(o, false);
}
function putLE64(f: Uint8Array, o: number, v: bigint): void {
  new DataView(f.buffer, f.byteOffset, f.byteLength).setBigUint64(o, BigInt.asUintN(64, v), true);
}
function getLE64(f: Uint8Array, o: number): bigint {
  return new DataView(f.buffer, f.byteOffset, f.byteLength).getBigUint64(o, true);
}

/** A value to put into an offset field: plausible, hostile, or random. */
function offsetValue(rnd: () => number, t: Targets, fileSize: number): bigint {
  const cs = t.cs;
  const r = rnd();
  if (r < 0.12) return 0n;
  if (r < 0.3) return BigInt(pick(rnd, t.metaOffsets));
  if (r < 0.42 && t.dataOffsets.length > 0) return BigInt(pick(rnd, t.dataOffsets));
  if (r < 0.55) return BigInt(Math.floor((rnd() * fileSize) / cs) * cs); // somewhere inside
  if (r < 0.65) return BigInt(Math.floor((rnd() * fileSize) / 512) * 512); // misaligned
  if (r < 0.75) return BigInt(Math.ceil(fileSize / cs) * cs + Math.floor(rnd() * 8) * cs); // past EOF
  if (r < 0.8) return BigInt(Math.floor(rnd() * 2 ** 40)) * 512n; // far away
  if (r < 0.85) return BigInt(fileSize - (fileSize % cs)); // the last cluster
  return BigInt(Math.floor(rnd() * cs)); // inside the header cluster
}

/**
 * Apply one seeded mutation to a file's bytes (in place; returns the new bytes when the
 * length changes) and describe it.
 */
export function mutate(
  format: Format,
  f: Uint8Array,
  rnd: () => number,
): { bytes: Uint8Array; what: string } {
  const t = format === "qcow2" ? qcow2Targets(f) : qedTargets(f);
  if (t === undefined) return { bytes: f, what: "nothing (unparsable)" };
  const fileSize = f.byteLength;
  const kinds: string[] = ["l1", "l2", "l2", "header"];
  if (format === "qcow2") kinds.push("reftable", "refblock", "refblock", "flags");
  if (t.snapshot.length > 0) kinds.push("snapshot");
  kinds.push("size");
  const kind = pick(rnd, kinds);
  const rw = format === "qcow2" ? { get: getBE64, put: putBE64 } : { get: getLE64, put: putLE64 };
  const entry = (list: number[], name: string): string => {
    if (list.length === 0) return "nothing (no entry)";
    const o = pick(rnd, list);
    const old = rw.get(f, o);
    let v: bigint;
    const r = rnd();
    if (r < 0.15) v = old ^ (1n << BigInt(Math.floor(rnd() * 64)));
    else if (format === "qcow2" && r < 0.25)
      v = 0x8000_0000_0000_0000n | (rnd() < 0.5 ? 0n : offsetValue(rnd, t, fileSize));
    else if (format === "qcow2" && name === "L2" && r < 0.35)
      v =
        (1n << 62n) |
        (BigInt(Math.floor(rnd() * 2 ** 52)) * 2n ** 9n + BigInt(Math.floor(rnd() * 512)));
    else if (format === "qcow2" && name === "L2" && r < 0.42)
      v = offsetValue(rnd, t, fileSize) | 1n;
    else if (format === "qed" && name === "L2" && r < 0.25) v = 1n;
    else
      v =
        offsetValue(rnd, t, fileSize) |
        (format === "qcow2" && rnd() < 0.5 ? 0x8000_0000_0000_0000n : 0n);
    rw.put(f, o, v);
    return `${name} entry at 0x${o.toString(16)}: 0x${old.toString(16)} -> 0x${v.toString(16)}`;
  };
  switch (kind) {
    case "l1":
      return { bytes: f, what: entry(t.l1, "L1") };
    case "l2":
      return { bytes: f, what: entry(t.l2, "L2") };
    case "reftable":
      return { bytes: f, what: entry(t.reftable, "refcount table") };
    case "refblock": {
      if (t.refblock.length === 0) return { bytes: f, what: "nothing (no refcount block)" };
      const b = pick(rnd, t.refblock);
      const i = Math.floor(rnd() * Math.min(b.entries, Math.ceil(fileSize / t.cs) + 4));
      const bitPos = i * b.bits;
      const max = 2 ** Math.min(b.bits, 32) - 1;
      const r = rnd();
      const v = r < 0.3 ? 0 : r < 0.6 ? 1 + Math.floor(rnd() * 3) : Math.floor(rnd() * (max + 1));
      // Write the entry (big-endian, any width; widths above 32 bits set the low word).
      if (b.bits >= 8) {
        const bytes = b.bits / 8;
        const o = b.offset + (bitPos >> 3);
        for (let k = 0; k < bytes; k++) f[o + bytes - 1 - k] = k < 4 ? (v >>> (8 * k)) & 0xff : 0;
      } else {
        const o = b.offset + (bitPos >> 3);
        const shift = bitPos & 7;
        const mask = ((1 << b.bits) - 1) << shift;
        f[o] = (f[o]! & ~mask) | ((v << shift) & mask);
      }
      return {
        bytes: f,
        what: `refcount block at 0x${b.offset.toString(16)} entry ${i} -> ${v & max}`,
      };
    }
    case "snapshot": {
      const o = pick(rnd, t.snapshot);
      if (rnd() < 0.6) {
        const old = getBE64(f, o);
        const v = offsetValue(rnd, t, fileSize);
        putBE64(f, o, v);
        return {
          bytes: f,
          what: `snapshot L1 offset at 0x${o.toString(16)}: 0x${old.toString(16)} -> 0x${v.toString(16)}`,
        };
      }
      const v = pick(rnd, [0, 1, 2, 7, 0x1_0000, 0x7fff_ffff]);
      new DataView(f.buffer, f.byteOffset).setUint32(o + 8, v, false);
      return { bytes: f, what: `snapshot L1 size at 0x${(o + 8).toString(16)} -> ${v}` };
    }
    case "flags": {
      // qcow2: dirty / corrupt / unknown autoclear bits.
      const field = pick(rnd, [72, 88]);
      const bit = field === 72 ? pick(rnd, [0n, 1n]) : BigInt(2 + Math.floor(rnd() * 60));
      const old = getBE64(f, field);
      putBE64(f, field, old ^ (1n << bit));
      return { bytes: f, what: `header field at ${field}: bit ${bit} flipped` };
    }
    case "size": {
      // Tear or extend the file end.
      const d = Math.floor(rnd() * 3 * t.cs) - 2 * t.cs;
      const n = Math.max(64 * 1024, fileSize + d);
      const out = new Uint8Array(n);
      out.set(f.subarray(0, Math.min(n, fileSize)));
      return { bytes: out, what: `file size ${fileSize} -> ${n}` };
    }
    default: {
      if (format === "qed") {
        const field = pick(rnd, [40, 40, 16]);
        if (field === 16) {
          f[16] = f[16]! ^ 2;
          return { bytes: f, what: "QED need-check bit flipped" };
        }
        const old = getLE64(f, 40);
        const v = offsetValue(rnd, t, fileSize);
        putLE64(f, 40, v);
        return {
          bytes: f,
          what: `QED L1 table offset 0x${old.toString(16)} -> 0x${v.toString(16)}`,
        };
      }
      const field = pick(rnd, ["rt", "rt", "rtc", "l1", "l1size", "snoff", "nbsn"]);
      const dv = new DataView(f.buffer, f.byteOffset);
      switch (field) {
        case "rt": {
          const old = getBE64(f, 48);
          const v = offsetValue(rnd, t, fileSize);
          putBE64(f, 48, v);
          return {
            bytes: f,
            what: `refcount table offset 0x${old.toString(16)} -> 0x${v.toString(16)}`,
          };
        }
        case "rtc": {
          const v = pick(rnd, [0, 1, 2, dv.getUint32(56) + 1, dv.getUint32(56) * 4, 0x10000]);
          dv.setUint32(56, v);
          return { bytes: f, what: `refcount table clusters -> ${v}` };
        }
        case "l1": {
          const old = getBE64(f, 40);
          const v = offsetValue(rnd, t, fileSize);
          putBE64(f, 40, v);
          return { bytes: f, what: `L1 table offset 0x${old.toString(16)} -> 0x${v.toString(16)}` };
        }
        case "l1size": {
          const v = pick(rnd, [
            0,
            1,
            dv.getUint32(36) + 1,
            Math.max(0, dv.getUint32(36) - 1),
            0x40_0001,
          ]);
          dv.setUint32(36, v);
          return { bytes: f, what: `L1 size -> ${v}` };
        }
        case "snoff": {
          const old = getBE64(f, 64);
          const v = offsetValue(rnd, t, fileSize);
          putBE64(f, 64, v);
          return {
            bytes: f,
            what: `snapshot table offset 0x${old.toString(16)} -> 0x${v.toString(16)}`,
          };
        }
        default: {
          const v = pick(rnd, [0, 1, dv.getUint32(60) + 1, 0x10000]);
          dv.setUint32(60, v);
          return { bytes: f, what: `nb_snapshots -> ${v}` };
        }
      }
    }
  }
}
