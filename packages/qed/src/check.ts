import type { BlockBackend } from "@qimg/io";
import { QED_F_NEED_CHECK, QED_KNOWN_AUTOCLEAR_FEATURES } from "./spec/constants.js";
import { encodeQedHeader } from "./spec/header.js";
import { QedTable } from "./spec/table.js";
import { QedImage, readQedMetadata } from "./image.js";
import type { QedCheckOptions, QedCheckResult } from "./types.js";
import { tornClusterGrown, tornClusterReferences, walkQed } from "./walk.js";

/**
 * Check a QED image's tables the way `qemu-img check` does: invalid L1/L2 entries (outside the
 * file, misaligned, inside the header) are corruptions, clusters referenced twice are
 * corruptions, unreferenced clusters are leaks. Never throws on corruption: problems are
 * returned as data. With `repair`, invalid entries are cleared and, when nothing unfixable
 * remains, the need-check bit is cleared. Leaks are reported but not repaired (as in QEMU).
 *
 * Give an open {@link QedImage} (no requests may be in flight) or a backend holding a QED file
 * (the header must be valid; header errors are thrown).
 */
export async function checkQed(
  target: QedImage | BlockBackend,
  options: QedCheckOptions = {},
): Promise<QedCheckResult> {
  if (target instanceof QedImage) return await target.check(options);
  const backend = target;
  const repair = options.repair === true;
  const meta = await readQedMetadata(backend);
  const { l1 } = meta;
  let header = meta.header;
  if (repair && (header.autoclearFeatures & ~QED_KNOWN_AUTOCLEAR_FEATURES) !== 0n) {
    // A read-write open clears the autoclear bits it does not know (as qemu-img check -r
    // does, before checking).
    header = {
      ...header,
      autoclearFeatures: header.autoclearFeatures & QED_KNOWN_AUTOCLEAR_FEATURES,
    };
    await backend.write(0, encodeQedHeader(header));
    await backend.flush();
  }
  let fileSize = meta.fileSize;
  const table = new QedTable(l1);
  const readL2 = async (offset: number): Promise<Uint8Array> => {
    const bytes = new Uint8Array(header.tableSize * header.clusterSize);
    await backend.read(offset, bytes, { zeroPastEof: true });
    return bytes;
  };
  const geometry = {
    clusterSize: header.clusterSize,
    tableSize: header.tableSize,
    headerSize: header.headerSize,
    fileSize,
  };
  let grown = false;
  if (repair && (await tornClusterReferences(geometry, meta.size, table, readL2)) === 1) {
    // The file ends inside a cluster that a table points into: keep the bytes still there
    // (QEMU drops the entries) by growing the file to the cluster's end.
    fileSize = Math.ceil(meta.size / header.clusterSize) * header.clusterSize;
    await backend.truncate(fileSize);
    grown = true;
  }
  const walked = await walkQed(
    {
      backend,
      geometry: { ...geometry, fileSize },
      l1TableOffset: header.l1TableOffset,
      imageSize: header.imageSize,
      l1: table,
      readL2,
    },
    repair,
  );
  const r = grown
    ? {
        ...walked,
        corruptionsFixed: walked.corruptionsFixed + 1,
        problems: [tornClusterGrown(geometry.fileSize, meta.size), ...walked.problems],
      }
    : walked;
  let markedClean = false;
  if (
    repair &&
    r.corruptions === 0 &&
    r.checkErrors === 0 &&
    (header.features & QED_F_NEED_CHECK) !== 0n
  ) {
    await backend.flush();
    await backend.write(
      0,
      encodeQedHeader({ ...header, features: header.features & ~QED_F_NEED_CHECK }),
    );
    await backend.flush();
    markedClean = true;
  } else if (repair && r.corruptionsFixed > 0) {
    await backend.flush();
  }
  return { ...r, leaksFixed: 0, imageEndOffset: fileSize, markedClean };
}
