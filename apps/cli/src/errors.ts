/**
 * The one place that turns an error into the line the user sees and the exit code.
 *
 * - Expected errors (a {@link CliError}, or any error of the `@qimg/structs` family) print one
 *   line, `qimg: <file>: <message>` (or `qimg: <message>` when no file applies), to stderr.
 * - Anything else is an internal error (a bug): the line says so and how to get the details;
 *   still one line, no stack trace.
 * - With `--debug` every error prints its stack trace (and causes).
 * - The exit code is the error's own `exitCode` when it has one, else the command's default
 *   for errors (1 for most commands, 2 for `compare`, as qemu-img does).
 */
import { inspect } from "node:util";
import { onQcow2Corruption } from "@qimg/qcow2";
import { ErrorCode, isQimgError } from "@qimg/structs";
import type { CliContext } from "./context.js";

/** An expected failure of a command, with an optional file it concerns and exit code. */
export class CliError extends Error {
  readonly file: string | undefined;
  readonly exitCode: number | undefined;

  constructor(
    message: string,
    options: { file?: string | undefined; exitCode?: number; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "CliError";
    this.file = options.file;
    this.exitCode = options.exitCode;
  }
}

/** Wraps an error thrown while working on `file`, so the message can name it. */
export class FileContextError extends Error {
  readonly file: string;
  readonly error: unknown;
  readonly exitCode: number | undefined;

  constructor(file: string, error: unknown, exitCode?: number) {
    super(error instanceof Error ? error.message : String(error), { cause: error });
    this.name = "FileContextError";
    this.file = file;
    this.error = error;
    this.exitCode = exitCode;
  }
}

/** Run `fn`, attributing any error it throws to `file` (and optionally an exit code). */
export async function inFile<T>(file: string, fn: () => Promise<T>, exitCode?: number): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof FileContextError || (e instanceof CliError && e.file !== undefined)) throw e;
    throw new FileContextError(file, e, exitCode);
  }
}

export interface DescribedError {
  /** The one line, without the trailing newline. */
  readonly line: string;
  /** True for bugs (not a CliError nor a qimg library error). */
  readonly internal: boolean;
  /** The exit code the error asks for, if any. */
  readonly exitCode: number | undefined;
  /** The innermost error (for the stack trace). */
  readonly error: unknown;
}

/** System errors in the C library's strerror() words, as qemu-img prints them. */
const ERRNO_TEXT: Readonly<Record<string, string>> = {
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  EPERM: "Operation not permitted",
  EISDIR: "Is a directory",
  ENOTDIR: "Not a directory",
  ENOSPC: "No space left on device",
  EROFS: "Read-only file system",
  EIO: "Input/output error",
  ELOOP: "Too many levels of symbolic links",
  EBUSY: "Device or resource busy",
  ENAMETOOLONG: "File name too long",
  EMFILE: "Too many open files",
  ENFILE: "Too many open files in system",
  EFBIG: "File too large",
  EDQUOT: "Disk quota exceeded",
  EEXIST: "File exists",
  ENXIO: "No such device or address",
  ENODEV: "No such device",
  ETXTBSY: "Text file busy",
  ENOMEM: "Cannot allocate memory",
  EAGAIN: "Resource temporarily unavailable",
  ENOTSUP: "Operation not supported",
  EOPNOTSUPP: "Operation not supported",
  EXDEV: "Invalid cross-device link",
  ESTALE: "Stale file handle",
  ENOTCONN: "Transport endpoint is not connected",
  ENOMEDIUM: "No medium found",
};

function errnoOf(e: unknown): string | undefined {
  return typeof e === "object" && e !== null && "code" in e && typeof e.code === "string"
    ? e.code
    : undefined;
}

/**
 * The message of `e`, with a leading `<file>: ` removed and system errors in strerror words:
 * the words are chosen by the errno code of the error's cause (never by the message); the
 * message only says where they go (after "<what> failed: ", or alone for a failed open).
 */
export function messageOf(e: unknown, file: string | undefined): string {
  if (e instanceof FileContextError) e = e.error;
  let message = e instanceof Error ? e.message : String(e);
  if (isQimgError(e)) {
    const errno = errnoOf(e.cause);
    const text = errno === undefined ? undefined : ERRNO_TEXT[errno];
    if (text !== undefined && message.includes(": open failed: ")) {
      // qemu-img says only the strerror() words of a failed open ("Could not open 'x': ...").
      message = text;
    } else if (text !== undefined) {
      // "<what> failed: ENOSPC: no space left on device, write" -> "<what> failed: No space..."
      const at = message.indexOf(` failed: ${errno}`);
      if (at >= 0) message = `${message.slice(0, at)} failed: ${text}`;
    }
  } else if (!(e instanceof CliError)) {
    const text = ERRNO_TEXT[errnoOf(e) ?? ""];
    if (text !== undefined) message = text;
  }
  if (file !== undefined && message.startsWith(`${file}: `))
    message = message.slice(file.length + 2);
  return message.split("\n")[0] ?? "";
}

/** The strerror() words QEMU's tools print for the typed errors of the drivers, by code. */
const CODE_TEXT: Partial<Record<ErrorCode, string>> = {
  // EPERM: a write to an image (or file) opened read-only, or marked corrupt.
  [ErrorCode.READ_ONLY]: "Operation not permitted",
  // EINVAL: a request the driver cannot take (a compressed write that is not one cluster).
  [ErrorCode.INVALID_ARGUMENT]: "Invalid argument",
  // EIO: the image's metadata is corrupt where the request went.
  [ErrorCode.CORRUPT_IMAGE]: "Input/output error",
  // EIO: a request the driver fails without a system error (a compressed write onto an
  // allocated cluster).
  [ErrorCode.IO]: "Input/output error",
};

/**
 * What qemu-io (and qemu-img's per-request messages) print for a failed request: the
 * strerror() words chosen by the error's code — a system error's errno, or the qimg error
 * family's `code` — else the error's own first line.
 */
export function requestErrorText(e: unknown): string {
  if (e instanceof FileContextError) e = e.error;
  if (isQimgError(e)) {
    const errno = errnoOf(e.cause);
    const text = (errno === undefined ? undefined : ERRNO_TEXT[errno]) ?? CODE_TEXT[e.code];
    if (text !== undefined) return text;
  } else if (!(e instanceof CliError)) {
    const text = ERRNO_TEXT[errnoOf(e) ?? ""];
    if (text !== undefined) return text;
  }
  const message = e instanceof Error ? e.message : String(e);
  return message.split("\n")[0] ?? "";
}

/** How an open that failed on the backing file begins (open.ts), as QEMU words it. */
export const BACKING_FAILED = "Could not open backing file: ";

/** What to print for `e`, and whether it is a bug. */
export function describeError(e: unknown): DescribedError {
  let file: string | undefined;
  let exitCode: number | undefined;
  let inner: unknown = e;
  if (inner instanceof FileContextError) {
    file = inner.file;
    exitCode = inner.exitCode;
    inner = inner.error;
  }
  if (inner instanceof CliError) {
    file = inner.file ?? file;
    exitCode = inner.exitCode ?? exitCode;
  }
  const expected =
    inner instanceof CliError ||
    isQimgError(inner) ||
    (errnoOf(inner) !== undefined && ERRNO_TEXT[errnoOf(inner) ?? ""] !== undefined);
  const message = messageOf(inner, file);
  const body = expected
    ? message
    : `internal error: ${message} (please report it; --debug prints the details)`;
  // An image whose backing file cannot be opened: qemu-img's words, naming the image first.
  const couldNotOpen = expected && file !== undefined && message.startsWith(BACKING_FAILED);
  return {
    line:
      file === undefined
        ? `qimg: ${body}`
        : couldNotOpen
          ? `qimg: Could not open '${file}': ${body}`
          : `qimg: ${file}: ${body}`,
    internal: !expected,
    exitCode,
    error: inner,
  };
}

function stackOf(e: unknown): string {
  let out = "";
  let cur: unknown = e;
  for (let depth = 0; cur !== undefined && cur !== null && depth < 8; depth++) {
    out +=
      (depth === 0 ? "" : "Caused by: ") +
      (cur instanceof Error ? (cur.stack ?? cur.message) : inspect(cur)) +
      "\n";
    cur = cur instanceof Error ? cur.cause : undefined;
  }
  return out;
}

/**
 * Print `e` to the context's stderr and return the exit code: the error's own, else
 * `defaultExitCode`.
 */
export function reportError(e: unknown, ctx: CliContext, defaultExitCode = 1): number {
  const d = describeError(e);
  ctx.stderr(d.line + "\n");
  if (ctx.debug) ctx.stderr(stackOf(d.error));
  return d.exitCode ?? defaultExitCode;
}

/**
 * Print the qcow2 driver's corruption events on stderr as QEMU does ("qcow2: Marking image as
 * corrupt: ...; further corruption events will be suppressed", or on a read-only open "qcow2:
 * Image is corrupt: ...; further non-fatal corruption events will be suppressed") until the
 * returned function is called.
 */
export function printCorruptionEvents(ctx: CliContext): () => void {
  return onQcow2Corruption((e) => {
    ctx.stderr(
      e.fatal
        ? `qcow2: Marking image as corrupt: ${e.message}; further corruption events will be suppressed\n`
        : `qcow2: Image is corrupt: ${e.message}; further non-fatal corruption events will be suppressed\n`,
    );
  });
}
