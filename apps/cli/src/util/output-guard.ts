/**
 * Removing what a failed convert or dd made: no half-written target is left behind.
 */
import { realpathSync, statSync, unlinkSync, type BigIntStats } from "node:fs";

/**
 * The output files of a convert (or dd) as they were before it began, to remove on failure the ones
 * it created or changed (a half-written target is never left behind; a file the convert did
 * not get to touch stays as it was).
 */
export class OutputGuard {
  private readonly before: (BigIntStats | undefined | null)[];

  /** Note how `paths` are now (call before touching any of them). */
  constructor(private readonly paths: readonly string[]) {
    // A name that cannot be looked up (too long, a file in the way of a directory...) is
    // left alone: nothing can have been made under it.
    this.before = paths.map((p) => {
      try {
        return statSync(p, { bigint: true, throwIfNoEntry: false });
      } catch {
        return null;
      }
    });
  }

  /** Remove the files the command created or changed. */
  undo(): void {
    this.paths.forEach((path, i) => {
      const was = this.before[i];
      if (was === null) return;
      const now = statSync(path, { bigint: true, throwIfNoEntry: false });
      if (now === undefined || !now.isFile()) return;
      const unchanged =
        was !== undefined &&
        was.ino === now.ino &&
        was.dev === now.dev &&
        was.size === now.size &&
        was.mtimeNs === now.mtimeNs &&
        was.ctimeNs === now.ctimeNs;
      if (unchanged) return;
      try {
        // Through a symlink, the file it names is the one that was written.
        unlinkSync(realpathSync(path));
      } catch {
        // Best effort: the error that made the convert fail is the one to report.
      }
    });
  }
}
