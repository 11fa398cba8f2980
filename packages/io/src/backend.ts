/**
 * The block backend interface: every driver in qimg does its I/O through this.
 *
 * Offsets and lengths are byte counts as `number` (safe integers). All methods are async;
 * implementations may complete synchronously underneath for speed.
 */
export interface ReadOptions {
  /**
   * When true, bytes past the end of the backend read as zeros instead of failing with a
   * `SHORT_READ` IoError. Default false.
   */
  readonly zeroPastEof?: boolean;
}

export type BackendKind = "file" | "block-device" | "memory" | "other";

export interface BlockBackend {
  /** True when writes, truncate and flush-with-data are refused. */
  readonly readOnly: boolean;
  /** What the backend sits on; QED refuses to create images on a block device. */
  readonly kind: BackendKind;
  /** A human-readable name for messages (a path, or "memory"). */
  readonly name: string;

  /** Read exactly `buf.length` bytes at `offset` into `buf`. */
  read(offset: number, buf: Uint8Array, options?: ReadOptions): Promise<void>;
  /** Write all of `data` at `offset`, growing the backend when the write passes its end. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** Current size in bytes. */
  size(): Promise<number>;
  /** Set the size: shrink, or grow with zeros. */
  truncate(size: number): Promise<void>;
  /** Release the backend; later calls fail with a `CLOSED` IoError. Idempotent. */
  close(): Promise<void>;
}
