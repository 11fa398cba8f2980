/**
 * Best-effort preallocation of the ranges a copy is about to write, with util-linux's
 * `fallocate` (Node has no binding for the system call).
 *
 * Why: buffered writes into a sparse file pay for delayed block allocation page by page; into
 * a range that was allocated in one call beforehand they are cheaper. Measured on ext4 with a
 * 1 GiB copy: 0.21 s instead of 0.29 s. Only ranges that are about to be written in full are
 * passed, so the result has the same holes as without preallocation; a block of zeros inside
 * such a range that the copy skips stays an unwritten extent, which reads as zeros and which
 * SEEK_DATA/SEEK_HOLE report as a hole on ext4 and XFS.
 *
 * Nothing depends on it: when the tool is missing, the file system refuses, or the platform is
 * not Linux, the copy runs as it would have without it.
 */

/** Ranges smaller than this are not worth a process start (about 3 ms). */
export const PREALLOCATE_MIN = 32 * 1024 * 1024;
/** At most this many ranges (the largest) are preallocated. */
const MAX_RANGES = 8;

export interface FileRange {
  readonly offset: number;
  readonly length: number;
}

async function fallocate(path: string, range: FileRange, keepSize: boolean): Promise<boolean> {
  // Loaded here: node:child_process costs start-up time on every run otherwise.
  const { spawn } = await import("node:child_process");
  const args = ["-o", String(range.offset), "-l", String(range.length)];
  if (keepSize) args.push("--keep-size");
  args.push("--", path);
  return new Promise((resolve) => {
    const child = spawn("fallocate", args, { stdio: "ignore" });
    child.on("error", () => resolve(false));
    child.on("exit", (code) => resolve(code === 0));
  });
}

/**
 * Preallocate the largest of `ranges` (each at least `minLength`, default PREALLOCATE_MIN,
 * bytes) in `path`. `keepSize`: do not change the file's size (ranges may lie past its end).
 * Resolves to the number of ranges preallocated; never rejects.
 */
export async function preallocate(
  path: string,
  ranges: readonly FileRange[],
  options: { keepSize?: boolean; minLength?: number } = {},
): Promise<number> {
  if (process.platform !== "linux") return 0;
  const min = options.minLength ?? PREALLOCATE_MIN;
  const chosen = ranges
    .filter((r) => r.length >= min && r.length > 0)
    .sort((a, b) => b.length - a.length)
    .slice(0, MAX_RANGES);
  let done = 0;
  for (const r of chosen) {
    if (!(await fallocate(path, r, options.keepSize === true))) break;
    done++;
  }
  return done;
}
