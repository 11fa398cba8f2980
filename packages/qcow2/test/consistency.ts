import { ClusterCache } from "@qimg/cluster-cache";
import type { BlockBackend } from "@qimg/io";
import { Refcounts } from "@qimg/refcount";
import { openQcow2, walkReferences } from "../src/index.js";

export interface Consistency {
  /** Clusters whose stored refcount is below their references (real corruption). */
  readonly corruptions: string[];
  /** Clusters whose stored refcount is above their references (harmless leaks). */
  readonly leaks: number;
  /** Problems the walk found (bad entries). */
  readonly problems: string[];
}

/**
 * A small reference checker for tests: count every reference with walkReferences and
 * compare with the stored refcounts of every cluster inside the file.
 */
export async function consistency(backend: BlockBackend): Promise<Consistency> {
  const image = await openQcow2(backend, { noBacking: true });
  const h = image.header;
  const cs = image.clusterSize;
  const fileSize = await backend.size();
  const n = Math.ceil(fileSize / cs);
  const refs = new Float64Array(n);
  const problems: string[] = [];
  await walkReferences(
    {
      backend,
      header: h,
      snapshots: image.snapshots,
      bitmaps: image.bitmaps,
      bitmapDirectory: image.bitmapDirectory,
    },
    {
      reference(r) {
        const first = Math.floor(r.offset / cs);
        const last = Math.floor((r.offset + Math.max(1, r.length) - 1) / cs);
        for (let c = first; c <= last && c < n; c++) refs[c]! += 1;
      },
      problem(p) {
        problems.push(p.message);
      },
    },
  );
  const cache = new ClusterCache({ backend, tableSize: cs, capacity: 16, name: "refcount" });
  const rc = await Refcounts.open({
    backend,
    cache,
    clusterBits: h.clusterBits,
    refcountOrder: h.refcountOrder,
    tableOffset: h.refcountTableOffset,
    tableClusters: h.refcountTableClusters,
    readOnly: true,
  });
  const stored = new Float64Array(n);
  await rc.readRange(0, stored);
  const corruptions: string[] = [];
  let leaks = 0;
  for (let c = 0; c < n; c++) {
    if (stored[c]! < refs[c]!)
      corruptions.push(`cluster ${c} refcount=${stored[c]} reference=${refs[c]}`);
    else if (stored[c]! > refs[c]!) leaks++;
  }
  return { corruptions, leaks, problems };
}
