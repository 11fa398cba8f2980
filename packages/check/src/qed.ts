import type { BlockBackend } from "@qimg/io";
import { checkQed } from "@qimg/qed";
import { checkExitCode } from "./result.js";
import type { CheckMessage, CheckResult } from "./result.js";
import type { CheckOptions } from "./qcow2.js";

/**
 * Check a QED image with `@qimg/qed`'s checker and report it in the common shape, with
 * qemu-img's numbers: QED has no image end offset and no compressed clusters; any repair
 * mode runs QED's repair (which clears bad table entries and the need-check bit).
 */
export async function checkQedImage(
  backend: BlockBackend,
  options: CheckOptions = {},
): Promise<CheckResult> {
  const repair = options.repair !== undefined;
  const first = await checkQed(backend, { repair });
  const messages: CheckMessage[] = first.problems.map((p) => ({
    kind: p.fixed
      ? "repair"
      : p.kind === "leak"
        ? "leak"
        : p.kind === "error"
          ? "error"
          : "corruption",
    text: p.message,
    offset: p.offset,
  }));
  let r = first;
  let repaired: CheckResult["repaired"];
  if (repair && (first.corruptionsFixed > 0 || first.leaksFixed > 0)) {
    repaired = { leaks: first.leaksFixed, corruptions: first.corruptionsFixed };
    r = await checkQed(backend, { repair: false });
    for (const p of r.problems) {
      messages.push({
        kind: p.kind === "leak" ? "leak" : p.kind === "error" ? "error" : "corruption",
        text: p.message,
        offset: p.offset,
      });
    }
  }
  const base = {
    checkErrors: r.checkErrors,
    corruptions: r.corruptions,
    leaks: r.leaks,
    failure: undefined,
  };
  return {
    filename: options.filename ?? backend.name,
    format: "qed",
    ...base,
    corruptionsFixed: first.corruptionsFixed,
    leaksFixed: first.leaksFixed,
    imageEndOffset: 0,
    totalClusters: r.totalClusters,
    allocatedClusters: r.allocatedClusters,
    fragmentedClusters: r.fragmentedClusters,
    compressedClusters: 0,
    messages,
    repaired,
    lostRanges: [],
    rebuilt: false,
    exitCode: checkExitCode(base),
  };
}
