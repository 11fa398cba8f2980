/** Copying persistent bitmaps from one qcow2 image to another (`qemu-img convert --bitmaps`). */
import { qcow2State } from "./image.js";
import type { Qcow2Image } from "./image.js";
import { copyBitmapsBetween } from "./bitmap-manage.js";
import type { CopyBitmapsOptions } from "./bitmap-manage.js";

/**
 * Copy every persistent bitmap of `source` (name, granularity, enabled flag and dirty bits)
 * into `target`, a read-write open of the same virtual size; they reach the disk when
 * `target` is closed. Everything is checked before anything changes: an inconsistent source
 * bitmap is refused with qemu-img convert's message (unless `skipBroken`), a name `target`
 * already has with qemu-img bitmap's.
 */
export function copyBitmaps(
  source: Qcow2Image,
  target: Qcow2Image,
  options: CopyBitmapsOptions = {},
): Promise<void> {
  return copyBitmapsBetween(qcow2State(source), qcow2State(target), options);
}
