/**
 * The one error family used by every qimg package.
 *
 * Every error carries a stable string `code` (from {@link ErrorCode}), the file `offset`
 * the problem applies to when there is one, and an optional `cause`. Messages name the
 * structure, the offending value and the bound it broke, e.g.
 * `L1 table at 0x30200 is not aligned to the cluster size 65536`.
 */
export const ErrorCode = {
  /** The bytes do not follow the format (bad magic, field out of range, misaligned offset). */
  FORMAT: "QIMG_FORMAT",
  /** The image uses a feature this implementation does not support. */
  UNSUPPORTED_FEATURE: "QIMG_UNSUPPORTED_FEATURE",
  /** Metadata is inconsistent (overlaps, references past EOF, corrupt bit set). */
  CORRUPT_IMAGE: "QIMG_CORRUPT_IMAGE",
  /** A value does not fit the representation (e.g. a u64 above 2^53-1). */
  RANGE: "QIMG_RANGE",
  /** The underlying storage failed (read, write, flush, truncate). */
  IO: "QIMG_IO",
  /** A read ended before the requested bytes could be returned. */
  SHORT_READ: "QIMG_SHORT_READ",
  /** A write or resize was attempted on something opened read-only. */
  READ_ONLY: "QIMG_READ_ONLY",
  /** An operation was attempted after close. */
  CLOSED: "QIMG_CLOSED",
  /** The caller passed an invalid argument (bad option, negative length). */
  INVALID_ARGUMENT: "QIMG_INVALID_ARGUMENT",
  /** The path is not something an image can live in (a directory, a socket). */
  NOT_A_FILE: "QIMG_NOT_A_FILE",
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** Options of every qimg error: where in the file, and what caused it. */
export interface QimgErrorOptions {
  /** Byte offset in the file that the error applies to. */
  readonly offset?: number | undefined;
  /** The underlying error, if any. */
  readonly cause?: unknown;
}

/** Base class of every error qimg throws on purpose. */
export class QimgError extends Error {
  /** Stable machine-readable code, from {@link ErrorCode}. */
  readonly code: ErrorCode;
  /** Byte offset in the file the error applies to, when there is one. */
  readonly offset: number | undefined;

  constructor(code: ErrorCode, message: string, options: QimgErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.offset = options.offset;
  }
}

/** The bytes do not follow the on-disk format. */
export class FormatError extends QimgError {
  constructor(message: string, options: QimgErrorOptions & { code?: ErrorCode } = {}) {
    super(options.code ?? ErrorCode.FORMAT, message, options);
  }
}

/** The image needs features we do not implement; `features` names each of them. */
export class UnsupportedFeatureError extends QimgError {
  /** The names of the unsupported features. */
  readonly features: readonly string[];

  constructor(message: string, features: readonly string[], options: QimgErrorOptions = {}) {
    super(ErrorCode.UNSUPPORTED_FEATURE, message, options);
    this.features = features;
  }
}

/** Image metadata is inconsistent. */
export class CorruptImageError extends QimgError {
  constructor(message: string, options: QimgErrorOptions = {}) {
    super(ErrorCode.CORRUPT_IMAGE, message, options);
  }
}

/** A value read from disk (or passed in) cannot be represented safely. */
export class RangeFormatError extends QimgError {
  constructor(message: string, options: QimgErrorOptions = {}) {
    super(ErrorCode.RANGE, message, options);
  }
}

/** The storage below failed, or an operation is not allowed on it. */
export class IoError extends QimgError {
  constructor(
    message: string,
    options: QimgErrorOptions & {
      code?:
        | typeof ErrorCode.IO
        | typeof ErrorCode.SHORT_READ
        | typeof ErrorCode.READ_ONLY
        | typeof ErrorCode.CLOSED
        | typeof ErrorCode.NOT_A_FILE;
    } = {},
  ) {
    super(options.code ?? ErrorCode.IO, message, options);
  }
}

/** The caller asked for something invalid. */
export class InvalidArgumentError extends QimgError {
  constructor(message: string, options: QimgErrorOptions = {}) {
    super(ErrorCode.INVALID_ARGUMENT, message, options);
  }
}

/** True for any error qimg threw on purpose (as opposed to an internal bug). */
export function isQimgError(e: unknown): e is QimgError {
  return e instanceof QimgError;
}

/** Format a byte offset the way messages print them: `0x30200`. */
export function hex(n: number | bigint): string {
  return "0x" + n.toString(16);
}
