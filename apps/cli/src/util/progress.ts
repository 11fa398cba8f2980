/**
 * `-p` progress, as qemu-img shows it: on stdout. When stdout is a terminal, a bar; otherwise
 * (a pipe, a file, a test's captured output) qemu-img's own lines, `    (12.34/100%)\r`, one
 * each time the progress moved by more than one percent, the last followed by a newline.
 *
 * The bar hides the cursor and turns line wrap off while it is drawn; both are restored on
 * every way out: stop, process exit, and SIGINT/SIGTERM/SIGHUP (Ctrl-C), after which the
 * signal takes its usual course.
 */
import { createRequire } from "node:module";
import type cliProgressModule from "cli-progress";
import type { CliContext } from "../context.js";

/**
 * cli-progress is loaded on first use: it costs about 15 ms of start-up, and most runs draw
 * no bar (no `-p`, or stdout is not a terminal).
 */
function loadCliProgress(): typeof cliProgressModule {
  return createRequire(import.meta.url)("cli-progress") as typeof cliProgressModule;
}

export interface Progress {
  /** Set the number of bytes done. */
  update(done: number): void;
  /** The operation completed: show 100% and end the progress output. */
  stop(): void;
  /**
   * End the progress output as it stands (qemu-img's progress end: a newline after the last
   * line), for commands that print their verdict after the last progress line.
   */
  end(): void;
}

const NONE: Progress = { update: () => undefined, stop: () => undefined, end: () => undefined };

/** qemu-img prints a new line only when the progress moved by more than this (percent). */
const MIN_STEP = 1;

/** Shows the cursor and turns line wrap back on. */
export const RESTORE_TERMINAL = "\x1b[?25h\x1b[?7h";

const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

export function startProgress(ctx: CliContext, enabled: boolean, total: number): Progress {
  if (!enabled) return NONE;
  // The real process's context has a progress stream; in-process contexts (tests, embedding)
  // have none, and get qemu-img's text lines on their stdout.
  const terminal =
    ctx.progressStream !== undefined && process.stdout.isTTY ? process.stdout : undefined;
  return terminal === undefined ? startLines(ctx, total) : startBar(terminal, total);
}

/**
 * `x` with two decimals as C's printf("%.2f") writes it: the exact binary value rounded,
 * ties to even (3.125 is "3.12"; JavaScript's toFixed says "3.13").
 */
export function printf2(x: number): string {
  const exact = x.toFixed(20); // exact digits of the double, far past the second decimal
  const dot = exact.indexOf(".");
  const kept = exact.slice(0, dot + 3);
  const rest = exact.slice(dot + 3);
  const half = "5".padEnd(rest.length, "0");
  const lastDigit = Number(kept[kept.length - 1]);
  const up = rest > half || (rest === half && lastDigit % 2 === 1);
  if (!up) return kept;
  return (Math.round(Number(kept) * 100 + 1) / 100).toFixed(2);
}

/** qemu-img's progress lines on the context's stdout. */
function startLines(ctx: CliContext, total: number): Progress {
  let lastPrinted = 0;
  const print = (percent: number): void => {
    lastPrinted = percent;
    ctx.stdout(`    (${printf2(percent)}/100%)\r`);
  };
  const percentOf = (done: number): number =>
    total <= 0 ? 100 : Math.min(100, (done / total) * 100);
  print(0);
  let stopped = false;
  return {
    update(done) {
      if (stopped) return;
      const percent = percentOf(done);
      if (percent > lastPrinted + MIN_STEP || percent === 100) print(percent);
    },
    stop() {
      if (stopped) return;
      print(100);
      this.end();
    },
    end() {
      if (stopped) return;
      stopped = true;
      ctx.stdout("\n");
    },
  };
}

/** A bar on a terminal, with the terminal restored on every exit path. */
function startBar(stream: NodeJS.WriteStream, total: number): Progress {
  const cliProgress = loadCliProgress();
  const bar = new cliProgress.SingleBar(
    {
      stream,
      format: "    ({percentage}/100%) [{bar}] {value_mib}/{total_mib} MiB",
      hideCursor: true,
      clearOnComplete: false,
      fps: 10,
    },
    cliProgress.Presets.shades_classic,
  );
  const restore = (): void => {
    try {
      stream.write(RESTORE_TERMINAL);
    } catch {
      // The terminal is gone: nothing to restore.
    }
  };
  const onExit = (): void => restore();
  const onSignal = (signal: NodeJS.Signals): void => {
    restore();
    detach();
    bar.stop();
    // Nobody else handles it: let it end the process as it would have without the bar.
    if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
  };
  const detach = (): void => {
    process.removeListener("exit", onExit);
    for (const s of SIGNALS) process.removeListener(s, onSignal);
  };
  process.on("exit", onExit);
  for (const s of SIGNALS) process.on(s, onSignal);

  const mib = (n: number): string => (n / 1024 / 1024).toFixed(1);
  const safeTotal = Math.max(total, 1);
  bar.start(safeTotal, 0, { value_mib: mib(0), total_mib: mib(total) });
  let stopped = false;
  return {
    update(done) {
      if (stopped) return;
      bar.update(Math.min(done, safeTotal), { value_mib: mib(done), total_mib: mib(total) });
    },
    stop() {
      if (stopped) return;
      bar.update(safeTotal, { value_mib: mib(total), total_mib: mib(total) });
      this.end();
    },
    end() {
      if (stopped) return;
      stopped = true;
      bar.stop();
      restore();
      detach();
    },
  };
}
