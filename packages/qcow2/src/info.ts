/** The facts `qemu-img info` shows for a qcow2 image. */
import {
  AutoclearFeatures,
  CompatibleFeatures,
  FEATURE_NAMES,
  IncompatibleFeatures,
} from "./spec/header.js";
import { BitmapFlag } from "./spec/bitmap-directory.js";
import type { Qcow2State } from "./state.js";
import type { Qcow2Info } from "./types.js";

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
