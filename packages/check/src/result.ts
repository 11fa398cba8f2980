/** What one line of the checker's report is about. */
export type CheckMessageKind = "corruption" | "leak" | "error" | "repair" | "info";

/** One per-item line, worded as qemu-img check prints it on stderr. */
export interface CheckMessage {
  /** What the line reports (an error, a leak, a repair, ...). */
  readonly kind: CheckMessageKind;
  /** The line, without the trailing newline. */
  readonly text: string;
  /** Host file offset the line is about, where there is one. */
  readonly offset?: number | undefined;
}

/** A guest byte range whose data a repair had to drop (its mapping pointed nowhere valid). */
export interface LostRange {
  /** Guest offset of the range, in bytes. */
  readonly offset: number;
  /** Its length, in bytes. */
  readonly length: number;
  /** Why the mapping was dropped. */
  readonly reason: string;
}

/** The result of checking one image: qemu-img check's facts plus our details. */
export interface CheckResult {
  /** The image's name as reported (`filename` in qemu-img's JSON). */
  readonly filename: string;
  /** The format that was checked. */
  readonly format: "qcow2" | "qed";
  /** Errors that kept parts of the check from completing (`check-errors`). */
  readonly checkErrors: number;
  /** Corruptions remaining after any repair (`corruptions`). */
  readonly corruptions: number;
  /** Leaked clusters remaining after any repair (`leaks`). */
  readonly leaks: number;
  /** Corruptions the repair fixed (`corruptions-fixed`). */
  readonly corruptionsFixed: number;
  /** Leaked clusters the repair fixed (`leaks-fixed`). */
  readonly leaksFixed: number;
  /** (highest used host cluster + 1) * cluster size; 0 when not reported (QED). */
  readonly imageEndOffset: number;
  /** Guest clusters of the virtual disk. */
  readonly totalClusters: number;
  /** Guest clusters allocated in the active L1 table. */
  readonly allocatedClusters: number;
  /** Allocated guest clusters not contiguous with the previous one on the host (`fragmented-clusters`). */
  readonly fragmentedClusters: number;
  /** Compressed guest clusters (`compressed-clusters`). */
  readonly compressedClusters: number;
  /** Per-item lines in order (stderr in qemu-img's human output), repair passes included. */
  readonly messages: readonly CheckMessage[];
  /**
   * Set after a repair that fixed something: the counts printed in "The following
   * inconsistencies were found and repaired"; the other fields then describe the re-check.
   */
  readonly repaired?: { readonly leaks: number; readonly corruptions: number } | undefined;
  /** Guest ranges whose mapping a repair dropped. */
  readonly lostRanges: readonly LostRange[];
  /** Whether the refcount structures were rebuilt from scratch. */
  readonly rebuilt: boolean;
  /** Set when the check could not complete ("Check failed: ..."): exit code 1, no summary. */
  readonly failure?: string | undefined;
  /** qemu-img check's exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks only. */
  readonly exitCode: 0 | 1 | 2 | 3;
}

/** qemu-img check's exit code for a result. */
export function checkExitCode(r: {
  readonly failure?: string | undefined;
  readonly checkErrors: number;
  readonly corruptions: number;
  readonly leaks: number;
}): 0 | 1 | 2 | 3 {
  if (r.failure !== undefined || r.checkErrors > 0) return 1;
  if (r.corruptions > 0) return 2;
  if (r.leaks > 0) return 3;
  return 0;
}

/** The JSON object `qemu-img check --output=json` prints (zero counters omitted, qemu's key order). */
export type QemuCheckJson = Record<string, string | number>;

/**
 * The object qemu-img check prints with `--output=json`: `check-errors`, `filename` and
 * `format` always, every other counter only when it is non-zero, in qemu-img's key order.
 * Returns undefined when the check failed (qemu-img prints no JSON then).
 */
export function toQemuJson(r: CheckResult): QemuCheckJson | undefined {
  if (r.failure !== undefined) return undefined;
  const out: QemuCheckJson = {};
  const opt = (key: string, v: number): void => {
    if (v !== 0) out[key] = v;
  };
  opt("image-end-offset", r.imageEndOffset);
  opt("compressed-clusters", r.compressedClusters);
  opt("total-clusters", r.totalClusters);
  opt("corruptions", r.corruptions);
  opt("corruptions-fixed", r.corruptionsFixed);
  out["check-errors"] = r.checkErrors;
  opt("leaks", r.leaks);
  opt("leaks-fixed", r.leaksFixed);
  opt("allocated-clusters", r.allocatedClusters);
  out.filename = r.filename;
  out.format = r.format;
  opt("fragmented-clusters", r.fragmentedClusters);
  return out;
}

/** `JSON.stringify` of {@link toQemuJson} indented as qemu-img does (4 spaces), with a newline. */
export function formatCheckJson(r: CheckResult): string {
  const j = toQemuJson(r);
  return j === undefined ? "" : `${JSON.stringify(j, null, 4)}\n`;
}

/** n * 100 / d with two decimals, rounded as C's printf("%0.2f") does (exact ties to even). */
function pct(n: number, d: number): string {
  const num = BigInt(n) * 10000n;
  const den = BigInt(d);
  let q = num / den;
  const twice = (num % den) * 2n;
  if (twice > den || (twice === den && q % 2n === 1n)) q += 1n;
  const s = q.toString().padStart(3, "0");
  return `${s.slice(0, -2)}.${s.slice(-2)}`;
}

/**
 * qemu-img check's human output: `stderr` holds the per-item lines (and "Check failed"),
 * `stdout` the repair report and the summary, byte for byte as qemu-img prints them.
 */
export function formatCheckHuman(r: CheckResult): { stdout: string; stderr: string } {
  let stderr = r.messages.map((m) => `${m.text}\n`).join("");
  let stdout = "";
  if (r.repaired !== undefined) {
    stdout +=
      "The following inconsistencies were found and repaired:\n\n" +
      `    ${r.repaired.leaks} leaked clusters\n` +
      `    ${r.repaired.corruptions} corruptions\n\n` +
      "Double checking the fixed image now...\n";
  }
  if (r.failure !== undefined) {
    stderr += `Check failed: ${r.failure}\n`;
    return { stdout, stderr };
  }
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) {
    stdout += "No errors were found on the image.\n";
  } else {
    if (r.corruptions > 0) {
      stdout +=
        `\n${r.corruptions} errors were found on the image.\n` +
        "Data may be corrupted, or further writes to the image may corrupt it.\n";
    }
    if (r.leaks > 0) {
      stdout +=
        `\n${r.leaks} leaked clusters were found on the image.\n` +
        "This means waste of disk space, but no harm to data.\n";
    }
    if (r.checkErrors > 0) {
      stdout += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    stdout +=
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ` +
      `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ` +
      `${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset !== 0) stdout += `Image end offset: ${r.imageEndOffset}\n`;
  if (r.checkErrors > 0) stderr += "Check failed\n";
  return { stdout, stderr };
}
