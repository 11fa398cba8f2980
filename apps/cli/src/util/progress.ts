/**
 * A progress bar on stderr, drawn only when stderr is a terminal (and `-p` was given).
 */
import { createRequire } from "node:module";
import type cliProgressModule from "cli-progress";
import type { CliContext } from "../context.js";

/**
 * cli-progress is loaded on first use: it costs about 15 ms of start-up, and most runs draw
 * no bar (no `-p`, or stderr is not a terminal).
 */
function loadCliProgress(): typeof cliProgressModule {
  return createRequire(import.meta.url)("cli-progress") as typeof cliProgressModule;
}

export interface Progress {
  /** Set the number of bytes done. */
  update(done: number): void;
  stop(): void;
}

const NONE: Progress = { update: () => undefined, stop: () => undefined };

export function startProgress(ctx: CliContext, enabled: boolean, total: number): Progress {
  if (!enabled || !ctx.stderrIsTTY || ctx.progressStream === undefined) return NONE;
  const cliProgress = loadCliProgress();
  const bar = new cliProgress.SingleBar(
    {
      stream: ctx.progressStream,
      format: "    ({percentage}/100%) [{bar}] {value_mib}/{total_mib} MiB",
      hideCursor: true,
      clearOnComplete: false,
      fps: 10,
    },
    cliProgress.Presets.shades_classic,
  );
  const mib = (n: number): string => (n / 1024 / 1024).toFixed(1);
  const safeTotal = Math.max(total, 1);
  bar.start(safeTotal, 0, { value_mib: mib(0), total_mib: mib(total) });
  return {
    update(done) {
      bar.update(Math.min(done, safeTotal), { value_mib: mib(done), total_mib: mib(total) });
    },
    stop() {
      bar.update(safeTotal, { value_mib: mib(total), total_mib: mib(total) });
      bar.stop();
    },
  };
}
