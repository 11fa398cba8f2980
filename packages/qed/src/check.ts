import type { BlockBackend } from "@qimg/io";
import { QED_F_NEED_CHECK } from "./spec/constants.js";
import { encodeQedHeader } from "./spec/header.js";
import { QedTable } from "./spec/table.js";
import { QedImage, readQedMetadata } from "./image.js";
import type { QedCheckOptions, QedCheckResult } from "./types.js";
import { walkQed } from "./walk.js";

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
  const { header, fileSize, l1 } = await readQedMetadata(backend);
  const r = await walkQed(
    {
      backend,
      geometry: {
        clusterSize: header.clusterSize,
        tableSize: header.tableSize,
        headerSize: header.headerSize,
        fileSize,
      },
      l1TableOffset: header.l1TableOffset,
      imageSize: header.imageSize,
      l1: new QedTable(l1),
      readL2: async (offset) => {
        const bytes = new Uint8Array(header.tableSize * header.clusterSize);
        await backend.read(offset, bytes);
        return bytes;
      },
    },
    repair,
  );
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
