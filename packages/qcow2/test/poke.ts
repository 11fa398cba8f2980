/**
 * Test helper: load a fixture into memory and poke big-endian fields, the way QEMU's iotests
 * use `poke_file`. Every poke works on a private copy; the extracted fixture stays untouched.
 */
import { readFileSync } from "node:fs";
import { fixturePath, getFixture } from "@qimg/fixtures";
import { MemoryBackend } from "@qimg/io";
import { openQcow2 } from "../src/index.js";
import type { Qcow2Image, Qcow2OpenOptions } from "../src/index.js";

const cache = new Map<string, Uint8Array>();

/** A fresh, writable copy of a fixture's main file (or another file of the fixture). */
export function loadFixture(name: string, file?: string): Uint8Array {
  const key = `${name}\0${file ?? ""}`;
  let bytes = cache.get(key);
  if (bytes === undefined) {
    bytes = new Uint8Array(readFileSync(fixturePath(name, file ?? getFixture(name).main)));
    cache.set(key, bytes);
  }
  return bytes.slice();
}

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function checkRange(bytes: Uint8Array, offset: number, width: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + width > bytes.byteLength) {
    throw new Error(`poke: [${offset}, +${width}) is outside the ${bytes.byteLength}-byte image`);
  }
}

export function pokeU8(bytes: Uint8Array, offset: number, value: number): void {
  checkRange(bytes, offset, 1);
  view(bytes).setUint8(offset, value);
}

export function pokeU16(bytes: Uint8Array, offset: number, value: number): void {
  checkRange(bytes, offset, 2);
  view(bytes).setUint16(offset, value, false);
}

export function pokeU32(bytes: Uint8Array, offset: number, value: number): void {
  checkRange(bytes, offset, 4);
  view(bytes).setUint32(offset, value, false);
}

export function pokeU64(bytes: Uint8Array, offset: number, value: number | bigint): void {
  checkRange(bytes, offset, 8);
  view(bytes).setBigUint64(offset, BigInt(value), false);
}

/** Overwrite bytes at `offset`. */
export function pokeBytes(
  bytes: Uint8Array,
  offset: number,
  data: Uint8Array | readonly number[],
): void {
  checkRange(bytes, offset, data.length);
  bytes.set(data, offset);
}

export function peekU8(bytes: Uint8Array, offset: number): number {
  checkRange(bytes, offset, 1);
  return view(bytes).getUint8(offset);
}

export function peekU16(bytes: Uint8Array, offset: number): number {
  checkRange(bytes, offset, 2);
  return view(bytes).getUint16(offset, false);
}

export function peekU32(bytes: Uint8Array, offset: number): number {
  checkRange(bytes, offset, 4);
  return view(bytes).getUint32(offset, false);
}

/** A u64 field as a bigint (every bit survives). */
export function peekU64(bytes: Uint8Array, offset: number): bigint {
  checkRange(bytes, offset, 8);
  return view(bytes).getBigUint64(offset, false);
}

/** A u64 field as a number (throws in the test, not the driver, when it is not safe). */
export function peekOffset(bytes: Uint8Array, offset: number): number {
  const v = peekU64(bytes, offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER))
    throw new Error(`peek: u64 at ${offset} is ${v}, above 2^53-1`);
  return Number(v);
}

/** Header field offsets (qcow2 spec, big-endian). */
export const H = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  compatibleFeatures: 80,
  autoclearFeatures: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;

/** The few header fields the tests navigate by, read straight from the bytes. */
export function layoutOf(bytes: Uint8Array): {
  version: number;
  clusterBits: number;
  clusterSize: number;
  size: number;
  headerLength: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
} {
  const version = peekU32(bytes, H.version);
  const clusterBits = peekU32(bytes, H.clusterBits);
  return {
    version,
    clusterBits,
    clusterSize: 2 ** clusterBits,
    size: peekOffset(bytes, H.size),
    headerLength: version >= 3 ? peekU32(bytes, H.headerLength) : 72,
    l1Size: peekU32(bytes, H.l1Size),
    l1TableOffset: peekOffset(bytes, H.l1TableOffset),
    refcountTableOffset: peekOffset(bytes, H.refcountTableOffset),
    refcountTableClusters: peekU32(bytes, H.refcountTableClusters),
    nbSnapshots: peekU32(bytes, H.nbSnapshots),
    snapshotsOffset: peekOffset(bytes, H.snapshotsOffset),
  };
}

/** The L2 table offset stored in L1 entry `i` (flags masked off). */
export function l2OffsetOf(bytes: Uint8Array, i: number): number {
  const { l1TableOffset } = layoutOf(bytes);
  return Number(peekU64(bytes, l1TableOffset + i * 8) & 0x00ff_ffff_ffff_fe00n);
}

/** Header extensions (type, offset of the 8-byte prefix, data length), as the file lays them out. */
export function extensionsOf(
  bytes: Uint8Array,
): { type: number; offset: number; length: number }[] {
  const { version, headerLength, clusterSize } = layoutOf(bytes);
  const backing = Number(peekU64(bytes, H.backingFileOffset));
  let pos = version >= 3 ? headerLength : 72;
  const end = Math.min(backing > pos ? backing : clusterSize, clusterSize, bytes.byteLength);
  const out: { type: number; offset: number; length: number }[] = [];
  while (pos + 8 <= end) {
    const type = peekU32(bytes, pos);
    if (type === 0) break;
    const length = peekU32(bytes, pos + 4);
    out.push({ type, offset: pos, length });
    pos += 8 + Math.ceil(length / 8) * 8;
  }
  return out;
}

/**
 * Open an in-memory image without backing or data files. The memory backend is read-only
 * unless `writableBackend` (for tests of what a read-write open refuses).
 */
export function openBytes(
  bytes: Uint8Array,
  options: Qcow2OpenOptions = {},
  writableBackend = false,
): Promise<Qcow2Image> {
  const backend = MemoryBackend.from(bytes, { readOnly: !writableBackend, name: "poked.qcow2" });
  return openQcow2(backend, { noBacking: true, ...options });
}
