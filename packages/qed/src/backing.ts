/**
 * Changing the backing file a QED image names (QEMU's bdrv_qed_change_backing_file, used by
 * `qemu-img rebase`): the header's backing-file feature bits and the name stored in the header
 * clusters. QED records a format only as "raw, do not probe" (QED_F_BACKING_FORMAT_NO_PROBE);
 * any other format is probed when the image is opened, so it is not stored.
 */
import { InvalidArgumentError } from "@qimg/structs";
import {
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_KNOWN_COMPAT_FEATURES,
  QED_SECTOR_SIZE,
} from "./spec/constants.js";
import { QED_HEADER_SIZE } from "./spec/header.js";
import type { QedHeader } from "./spec/header.js";

/** The backing file a QED image should name, or none. */
export interface QedBackingChange {
  /** The backing file name to store; undefined removes the backing file. */
  readonly filename: string | undefined;
  /** The backing format: only "raw" is recorded (as the no-probe bit); others are probed. */
  readonly format?: string | undefined;
}

/** The writes that change the backing file, in order, each followed by a sync. */
export interface QedBackingPlan {
  /** The new header. */
  readonly header: QedHeader;
  /** The name bytes and where they go (written and synced before the header), if any. */
  readonly name: { readonly offset: number; readonly bytes: Uint8Array } | undefined;
}

const enc = new TextEncoder();

/**
 * Plan a backing file change of a QED image whose header is `header`. The name goes right
 * after the header when header and name fit one 512-byte sector (then both are one write,
 * which a crash cannot tear: the caller writes them together); otherwise it is first written
 * past the old name, inside the header clusters, so the old name stays valid until the
 * header (one sector) switches to the new one. Refuses, as QEMU does, a new backing file
 * when unknown compatible features are set (the header clusters may hold data we do not
 * know), and a name that does not fit the header clusters.
 */
export function planQedBackingChange(header: QedHeader, change: QedBackingChange): QedBackingPlan {
  const name = change.filename === undefined ? undefined : enc.encode(change.filename);
  if (name !== undefined && (header.compatFeatures & ~QED_KNOWN_COMPAT_FEATURES) !== 0n) {
    throw new InvalidArgumentError(
      "Operation not supported: the QED image has unknown compatible features, so no backing file name can be added",
    );
  }
  const area = header.headerSize * header.clusterSize;
  let features = header.features & ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE);
  if (name === undefined) {
    return {
      header: { ...header, features, backingFilenameOffset: 0, backingFilenameSize: 0 },
      name: undefined,
    };
  }
  features |= QED_F_BACKING_FILE;
  if (change.format === "raw") features |= QED_F_BACKING_FORMAT_NO_PROBE;
  if (QED_HEADER_SIZE + name.byteLength > area) {
    throw new InvalidArgumentError(
      `No space left on device: the backing file name of ${name.byteLength} bytes does not fit the ${area}-byte QED header area`,
    );
  }
  let offset = QED_HEADER_SIZE;
  if (QED_HEADER_SIZE + name.byteLength > QED_SECTOR_SIZE) {
    // Stage the name past the old one (sector aligned) when the header area has room.
    const oldEnd =
      (header.features & QED_F_BACKING_FILE) !== 0n
        ? header.backingFilenameOffset + header.backingFilenameSize
        : QED_HEADER_SIZE;
    const at = Math.ceil(Math.max(oldEnd, QED_SECTOR_SIZE) / QED_SECTOR_SIZE) * QED_SECTOR_SIZE;
    if (at + name.byteLength <= area) offset = at;
  }
  return {
    header: {
      ...header,
      features,
      backingFilenameOffset: offset,
      backingFilenameSize: name.byteLength,
    },
    name: { offset, bytes: name },
  };
}
