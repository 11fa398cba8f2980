/**
 * The checks and errors every format driver shares, so that raw, qcow2 and QED refuse the same
 * requests with the same typed errors (see `WritableDiskImage`).
 */
import { ErrorCode, InvalidArgumentError, IoError } from "@qimg/structs";

/**
 * Check a guest request of `length` bytes at `offset` against an image of `size` bytes:
 * both must be non-negative safe integers and the request must end inside the image.
 * Throws an `InvalidArgumentError` (code `INVALID_ARGUMENT`): `invalid request: offset -1,
 * length 1`, or `request [4194303, +2) is past the end of the 4194304-byte disk`, where
 * `what` names the image ("disk" unless a driver names itself, e.g. "QED image").
 */
export function checkRequest(offset: number, length: number, size: number, what = "disk"): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new InvalidArgumentError(`invalid request: offset ${offset}, length ${length}`);
  }
  if (offset + length > size) {
    throw new InvalidArgumentError(
      `request [${offset}, +${length}) is past the end of the ${size}-byte ${what}`,
    );
  }
}

/** The error of any call on an image after `close()`: an `IoError` of code `CLOSED`. */
export function imageClosedError(name: string): IoError {
  return new IoError(`${name}: image is closed`, { code: ErrorCode.CLOSED });
}

/**
 * The error of a write, zero write, discard or resize on an image opened read-only: an
 * `IoError` of code `READ_ONLY` (`why` replaces the default reason).
 */
export function imageReadOnlyError(name: string, why = "image is opened read-only"): IoError {
  return new IoError(`${name}: ${why}`, { code: ErrorCode.READ_ONLY });
}

/**
 * The error of a read that needs the backing file of an image opened without it (no
 * `openBacking` was given): an `InvalidArgumentError`.
 */
export function backingNotOpenedError(name: string, backingFilename: string): InvalidArgumentError {
  return new InvalidArgumentError(
    `${name}: image has backing file "${backingFilename}" but it was not opened (pass openBacking)`,
  );
}

/**
 * The error of a read-write open of an image that names a backing file when no `openBacking`
 * was given (writes would need copy-on-write from it): an `InvalidArgumentError`.
 */
export function noBackingOpenerError(backingFilename: string): InvalidArgumentError {
  return new InvalidArgumentError(
    `image has the backing file '${backingFilename}' but no backing opener was given`,
  );
}
