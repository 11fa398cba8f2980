/**
 * Argument checks shared by the backends. Browser-safe: no Node APIs.
 * @internal
 */
import { InvalidArgumentError, IoError, ErrorCode } from "@qimg/structs";

/** Throw unless `value` is a non-negative safe integer. */
export function checkNonNegativeInt(value: number, what: string, backend: string): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new InvalidArgumentError(
      `${backend}: ${what} ${String(value)} is not a non-negative safe integer`,
    );
  }
}

/** Check an I/O range: `offset` and `offset + length` must be non-negative safe integers. */
export function checkRange(offset: number, buf: Uint8Array, backend: string): void {
  if (!(buf instanceof Uint8Array)) {
    throw new InvalidArgumentError(`${backend}: buffer must be a Uint8Array`);
  }
  checkNonNegativeInt(offset, "offset", backend);
  if (!Number.isSafeInteger(offset + buf.length)) {
    throw new InvalidArgumentError(
      `${backend}: range offset ${offset} + length ${buf.length} passes 2^53-1`,
      { offset },
    );
  }
}

/** The typed error for a read that passes the end of the backend. */
export function shortRead(backend: string, offset: number, length: number, size: number): IoError {
  return new IoError(
    `${backend}: read of ${length} bytes at offset ${offset} passes the end of the backend (size ${size})`,
    { code: ErrorCode.SHORT_READ, offset },
  );
}

export function closedError(backend: string): IoError {
  return new IoError(`${backend}: backend is closed`, { code: ErrorCode.CLOSED });
}

export function readOnlyError(backend: string, op: string): IoError {
  return new IoError(`${backend}: cannot ${op}: opened read-only`, { code: ErrorCode.READ_ONLY });
}

/**
 * Run a synchronous body and return its result as a promise: a throw becomes a rejection,
 * never a synchronous exception. (Same as an `async` function without `await`, which
 * typed lint rules flag.)
 */
export function settle<T>(body: () => T): Promise<T> {
  try {
    return Promise.resolve(body());
  } catch (e) {
    return Promise.reject(e instanceof Error ? e : new Error(String(e)));
  }
}
