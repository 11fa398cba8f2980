/** The facts `qemu-img info` shows for a qcow2 image. */
import {
  AutoclearFeatures,
  CompatibleFeatures,
  FEATURE_NAMES,
  IncompatibleFeatures,
} from "./spec/header.js";
import { BitmapFlag } from "./spec/bitmap-directory.js";
import { Qcow2State } from "./state.js";
import type { Qcow2Info } from "./types.js";
import { CorruptImageError, U64TableView } from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";
import { readQcow2Metadata } from "./layout.js";
import { LUKS_HEADER_SIZE, decodeLuksHeader, luksInfo } from "./spec/luks.js";
import type { LuksInfo } from "./spec/luks.js";

/** The facts `qemu-img info` shows. */
export function info(s: Qcow2State): Qcow2Info {
  const h = s.hdr;
  const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
  const compat = CompatibleFeatures.decode(h.compatibleFeatures);
  const autoclear = AutoclearFeatures.decode(h.autoclearFeatures);
  const name = (kind: "incompatible" | "compatible" | "autoclear", mask: bigint): string[] => {
    const out: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if (((mask >> BigInt(bit)) & 1n) === 0n) continue;
      const known = (FEATURE_NAMES[kind] as readonly string[])[bit];
      out.push(
        s.featureNames.find((f) => f.type === kind && f.bit === bit)?.name ??
          known ??
          `${kind} bit ${bit}`,
      );
    }
    return out;
  };
  return {
    virtualSize: h.size,
    clusterSize: s.clusterSize,
    compat: h.version === 2 ? "0.10" : "1.1",
    version: h.version,
    dirty: incompat.has("dirty"),
    corrupt: incompat.has("corrupt"),
    lazyRefcounts: compat.has("lazyRefcounts"),
    refcountBits: 2 ** h.refcountOrder,
    extendedL2: s.extendedL2,
    compressionType: h.compressionType === 1 ? "zstd" : "zlib",
    encrypted: h.cryptMethod !== 0,
    backingFilename: s.backingFilename,
    backingFormat: s.backingFormat,
    dataFile: s.dataFileName,
    dataFileRaw: autoclear.has("rawExternalData"),
    snapshots: s.snapshots.map((s) => ({
      id: s.id,
      name: s.name,
      vmStateSize: s.vmStateSize,
      dateSec: s.dateSec,
      dateNsec: s.dateNsec,
      vmClockNsec: s.vmClockNsec,
      diskSize: s.diskSize,
      icount:
        s.icount === undefined || s.icount === 0xffff_ffff_ffff_ffffn
          ? undefined
          : BigInt.asIntN(64, s.icount),
      l1TableOffset: s.l1TableOffset,
      l1Size: s.l1Size,
    })),
    bitmaps: s.bitmaps.map((b) => ({
      name: b.name,
      granularity: 2 ** b.granularityBits,
      flags: [
        ...((b.flags & BitmapFlag.inUse) !== 0 ? ["in-use"] : []),
        ...((b.flags & BitmapFlag.auto) !== 0 ? ["auto"] : []),
      ],
    })),
    features: {
      incompatible: name("incompatible", h.incompatibleFeatures),
      compatible: name("compatible", h.compatibleFeatures),
      autoclear: name("autoclear", h.autoclearFeatures),
    },
  };
}

/** The `encrypt` object `qemu-img info` shows for an encrypted image (no key needed). */
export type Qcow2EncryptionInfo =
  { readonly format: "aes" } | ({ readonly format: "luks" } & LuksInfo);

/**
 * The `qemu-img info` facts of an encrypted qcow2 image (AES or LUKS), which the driver does
 * not open (it cannot decrypt): the header, extensions, snapshots and bitmaps are read and
 * validated as an open does, and the LUKS header where the encryption header extension points
 * is decoded. Nothing else is read; `undefined` for an image that is not encrypted.
 */
export async function readEncryptedQcow2Info(
  backend: BlockBackend,
): Promise<{ info: Qcow2Info; encrypt: Qcow2EncryptionInfo } | undefined> {
  const word = new Uint8Array(4);
  await backend.read(32, word);
  const cryptMethod = new DataView(word.buffer).getUint32(0, false);
  if (cryptMethod === 0) return undefined;
  // The metadata reader refuses encrypted images; it reads this one with crypt_method 0 in
  // its view of the header, and the real value is put back.
  const masked: BlockBackend = {
    readOnly: true,
    kind: backend.kind,
    name: backend.name,
    read: async (offset, buf, options) => {
      await backend.read(offset, buf, options);
      for (let i = Math.max(32, offset); i < Math.min(36, offset + buf.length); i++) {
        buf[i - offset] = 0;
      }
    },
    write: () => Promise.reject(new Error("read-only view")),
    flush: () => Promise.resolve(),
    size: () => backend.size(),
    truncate: () => Promise.reject(new Error("read-only view")),
    close: () => Promise.resolve(),
  };
  const meta = await readQcow2Metadata(masked, { noBacking: true });
  const header = { ...meta.header, cryptMethod };
  const s = new Qcow2State(backend, {
    header,
    fileSize: meta.fileSize,
    extensions: meta.extensions,
    featureNames: meta.featureNames,
    l1: new U64TableView(new Uint8Array(0), "big"),
    snapshots: meta.snapshots,
    bitmaps: meta.bitmaps,
    backingFilename: meta.backingFilename,
    backingFormat: meta.backingFormat,
    dataFileName: meta.dataFileName,
    l2CacheBytes: undefined,
    bitmapDirectory: meta.bitmapDirectory,
    noBacking: true,
  });
  if (cryptMethod === 1) return { info: info(s), encrypt: { format: "aes" } };
  const at = meta.encryptionHeader;
  if (at === undefined || at.length < LUKS_HEADER_SIZE) {
    throw new CorruptImageError("LUKS-encrypted image has no (complete) encryption header", {
      offset: 32,
    });
  }
  const bytes = new Uint8Array(LUKS_HEADER_SIZE);
  await backend.read(at.offset, bytes);
  return {
    info: info(s),
    encrypt: { format: "luks", ...luksInfo(decodeLuksHeader(bytes, at.offset)) },
  };
}
