/**
 * How large a qcow2 file gets (qemu-img measure; QEMU's qcow2_measure and
 * qcow2_calc_prealloc_size): the metadata for a fully allocated image plus the data clusters
 * a copy of a source needs, and the room its persistent bitmaps take.
 */
import { InvalidArgumentError } from "@qimg/structs";
import type { DiskImage } from "@qimg/io";

/** What {@link measureQcow2} needs to know about the image to be created. */
export interface Qcow2MeasureOptions {
  /** Virtual disk size in bytes (rounded up to the cluster size, as QEMU does). */
  readonly virtualSize: number;
  /** Cluster size in bytes (default 65536). */
  readonly clusterSize?: number;
  /** Refcount width in bits (default 16). */
  readonly refcountBits?: number;
  /** Extended L2 entries (16-byte L2 entries). */
  readonly extendedL2?: boolean;
  /** `preallocation`: `falloc` and `full` make every data cluster required. */
  readonly preallocation?: "off" | "metadata" | "falloc" | "full";
  /**
   * Bytes of data clusters a copy needs (QEMU counts every target cluster holding data);
   * undefined measures an empty image. Ignored (all of the disk) with `falloc`/`full`.
   */
  readonly dataBytes?: number;
}

/** qemu-img measure's numbers. */
export interface Qcow2Measure {
  /** Bytes the file needs for this content (`required`). */
  readonly required: number;
  /** Bytes the file needs when every cluster is allocated (`fully-allocated`). */
  readonly fullyAllocated: number;
}

const roundUp = (n: number, m: number): number => Math.ceil(n / m) * m;

/**
 * Bytes of refcount table and blocks that count `clusters` clusters and themselves: the
 * fixed point where more blocks need no more table and no more blocks (QEMU's
 * qcow2_refcount_metadata_size without the generous increase).
 */
export function refcountMetadataSize(
  clusters: number,
  clusterSize: number,
  refcountBits: number,
): number {
  const perTableCluster = clusterSize / 8;
  const perBlock = (clusterSize * 8) / refcountBits;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/**
 * Size of a fully preallocated image of `totalSize` bytes: header cluster, L2 tables for every
 * cluster, the L1 table in whole clusters, refcount metadata for all of it, and the data
 * (QEMU's qcow2_calc_prealloc_size).
 */
export function qcow2PreallocSize(
  totalSize: number,
  clusterSize: number,
  refcountBits: number,
  extendedL2: boolean,
): number {
  const aligned = roundUp(totalSize, clusterSize);
  const entry = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  const l2Entries = roundUp(aligned / clusterSize, clusterSize / entry);
  meta += l2Entries * entry;
  const l1Entries = roundUp((l2Entries * entry) / clusterSize, clusterSize / 8);
  meta += l1Entries * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountBits);
  return meta + aligned;
}

/**
 * qemu-img measure's `required` and `fully-allocated` for a qcow2 target. Refuses (with
 * qemu-img's words) a size whose L1 table would pass QEMU's 32 MiB limit.
 */
export function measureQcow2(o: Qcow2MeasureOptions): Qcow2Measure {
  const cs = o.clusterSize ?? 65536;
  const ext = o.extendedL2 ?? false;
  const virtualSize = roundUp(o.virtualSize, cs);
  const l2Tables = Math.ceil(virtualSize / cs / (cs / (ext ? 16 : 8)));
  if (l2Tables * 8 > 32 * 1024 * 1024) {
    throw new InvalidArgumentError("The image size is too large (try using a larger cluster size)");
  }
  let data = o.dataBytes ?? 0;
  if (o.preallocation === "full" || o.preallocation === "falloc") data = virtualSize;
  const fullyAllocated = qcow2PreallocSize(virtualSize, cs, o.refcountBits ?? 16, ext);
  return { required: fullyAllocated - virtualSize + data, fullyAllocated };
}

/**
 * Bytes a copy of `image` needs for data clusters of `clusterSize`: every target cluster that
 * holds a byte of data (allocated somewhere in the chain and not reading as zeros), walked by
 * block status as QEMU's qcow2_measure does. `size` is the length walked (default the image's
 * virtual size).
 *
 * QEMU's block status also asks the file system where an image's data clusters have holes
 * (SEEK_DATA) and counts those parts as zeros; Node has no way to ask, so qimg counts every
 * stored data cluster. Where the source file has such holes (preallocation=metadata, clusters
 * reused after a discard punched them) qimg's `required` is larger than QEMU's, never smaller.
 */
export async function measureDataBytes(
  image: DiskImage,
  clusterSize: number,
  size = image.virtualSize,
): Promise<number> {
  let required = 0;
  let offset = 0;
  while (offset < size) {
    const st = await image.blockStatus(offset, size - offset);
    let n = Math.min(st.length, size - offset);
    if (n <= 0) break;
    if (!st.zero && st.data && st.present) {
      n = roundUp(offset + n, clusterSize) - offset;
      required += (offset % clusterSize) + n;
    }
    offset += n;
  }
  return required;
}

/** A persistent bitmap as measured: its name and granularity. */
export interface MeasuredBitmap {
  /** The bitmap's name (its UTF-8 length counts). */
  readonly name: string;
  /** Bytes of guest data per bit. */
  readonly granularity: number;
}

/**
 * Room the persistent bitmaps of a `diskSize`-byte source take in a qcow2 target of
 * `clusterSize` (qemu-img measure's `bitmaps`): each bitmap's data clusters as if all were
 * allocated, its bitmap table in whole clusters, and the directory in whole clusters.
 */
export function measureBitmaps(
  bitmaps: readonly MeasuredBitmap[],
  diskSize: number,
  clusterSize: number,
): number {
  let size = 0;
  let dir = 0;
  const enc = new TextEncoder();
  for (const b of bitmaps) {
    const bytes = Math.ceil(Math.ceil(diskSize / b.granularity) / 8);
    const clusters = Math.ceil(bytes / clusterSize);
    size += clusters * clusterSize;
    size += roundUp(clusters * 8, clusterSize);
    dir += roundUp(24 + enc.encode(b.name).length, 8);
  }
  return size + roundUp(dir, clusterSize);
}
