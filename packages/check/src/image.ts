import type { BlockBackend } from "@qimg/io";
import { InvalidArgumentError } from "@qimg/structs";
import { checkQcow2 } from "./qcow2.js";
import type { CheckOptions } from "./qcow2.js";
import { checkQedImage } from "./qed.js";
import type { CheckResult } from "./result.js";

/** Image formats the checker knows. */
export type CheckFormat = "qcow2" | "qed";

/**
 * Check (and optionally repair) an image of the given format. Returns the verdict as data;
 * throws a typed error (`QimgError`) only when the image cannot be opened at all, which
 * qemu-img reports as "Could not open" with exit code 1.
 */
export async function checkImage(
  backend: BlockBackend,
  format: CheckFormat,
  options: CheckOptions = {},
): Promise<CheckResult> {
  if (format === "qcow2") return await checkQcow2(backend, options);
  if (format === "qed") return await checkQedImage(backend, options);
  throw new InvalidArgumentError(`qemu-img check does not support the format '${String(format)}'`);
}
