/**
 * Where a command sends its output. The real CLI writes to the process streams; tests pass
 * collectors so commands can be run in-process.
 */
export interface CliContext {
  /** Results (stdout). */
  readonly stdout: (text: string) => void;
  /** Diagnostics and progress (stderr). */
  readonly stderr: (text: string) => void;
  /** Whether stderr is a terminal: progress bars are drawn only then. */
  readonly stderrIsTTY: boolean;
  /** The stream progress bars draw on (only used when `stderrIsTTY`). */
  readonly progressStream: NodeJS.WritableStream | undefined;
  /** Print stack traces for every error (`--debug`). */
  debug: boolean;
  /**
   * End the process at once, without running any cleanup (qemu-io's `abort`, `sigraise`).
   * Undefined for in-process contexts: the command then stops and returns the code instead.
   */
  readonly exitNow?: ((code: number) => never) | undefined;
  /** Send `signal` to this process (qemu-io's `sigraise`); undefined in-process. */
  readonly raiseSignal?: ((signal: number) => void) | undefined;
}

/**
 * The context of the real process. The process streams are touched only when used (creating
 * one costs start-up time); `used` records which ones were, so the caller can wait for just
 * those to drain.
 */
export function processContext(
  used: { stdout: boolean; stderr: boolean } = { stdout: false, stderr: false },
): CliContext {
  return {
    stdout: (text) => {
      used.stdout = true;
      process.stdout.write(text);
    },
    stderr: (text) => {
      used.stderr = true;
      process.stderr.write(text);
    },
    get stderrIsTTY() {
      return process.stderr.isTTY;
    },
    get progressStream() {
      used.stderr = true;
      return process.stderr;
    },
    debug: false,
    exitNow: (code) => process.exit(code),
    raiseSignal: (signal) => {
      process.kill(process.pid, signal);
    },
  };
}

/** A context that collects output in strings (for tests and embedding). */
export interface CapturedContext extends CliContext {
  readonly out: { stdout: string; stderr: string };
}

export function captureContext(
  options: { stderrIsTTY?: boolean; debug?: boolean } = {},
): CapturedContext {
  const out = { stdout: "", stderr: "" };
  return {
    out,
    stdout: (text) => {
      out.stdout += text;
    },
    stderr: (text) => {
      out.stderr += text;
    },
    stderrIsTTY: options.stderrIsTTY ?? false,
    progressStream: undefined,
    debug: options.debug ?? false,
  };
}
