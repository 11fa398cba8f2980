/**
 * Shared arithmetic for refcount structures: which table entry and block entry describe a
 * host cluster, and argument checks for cluster_bits / refcount_order.
 */
import { InvalidArgumentError } from "@qimg/structs";
import { refcountBitsOf } from "./spec/refcount-block.js";

/** Smallest and largest cluster_bits qcow2 allows (512 bytes .. 2 MiB). */
export const MIN_CLUSTER_BITS = 9;
/** Largest cluster_bits (2 MiB clusters). */
export const MAX_CLUSTER_BITS = 21;

/** The sizes that follow from cluster_bits and refcount_order. */
export interface RefcountGeometry {
  /** header.cluster_bits. */
  readonly clusterBits: number;
  /** 2^clusterBits bytes. */
  readonly clusterSize: number;
  /** header.refcount_order. */
  readonly refcountOrder: number;
  /** 2^refcountOrder: the width of one refcount in bits. */
  readonly refcountBits: number;
  /** Entries in one refcount block: cluster_size * 8 / refcount_bits. */
  readonly entriesPerBlock: number;
  /** u64 entries in one refcount table cluster. */
  readonly entriesPerTableCluster: number;
}

/** Validate cluster_bits and refcount_order and derive the sizes that follow from them. */
export function refcountGeometry(clusterBits: number, refcountOrder: number): RefcountGeometry {
  if (
    !Number.isInteger(clusterBits) ||
    clusterBits < MIN_CLUSTER_BITS ||
    clusterBits > MAX_CLUSTER_BITS
  ) {
    throw new InvalidArgumentError(
      `cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (512 bytes to 2 MiB clusters)`,
    );
  }
  const refcountBits = refcountBitsOf(refcountOrder);
  const clusterSize = 2 ** clusterBits;
  return {
    clusterBits,
    clusterSize,
    refcountOrder,
    refcountBits,
    entriesPerBlock: (clusterSize * 8) / refcountBits,
    entriesPerTableCluster: clusterSize / 8,
  };
}
