/**
 * A block backend over a file or block device (Node only).
 *
 * Design: the async methods do their I/O with positional *synchronous* calls
 * (`fs.readSync` / `fs.writeSync` with a position). For the access pattern of image drivers
 * (small random reads that mostly hit the page cache) this is about an order of magnitude
 * faster than `fs.promises` FileHandle reads, which pay for a libuv thread-pool round trip,
 * a promise and a FileHandle bookkeeping per call. The cost: a read that misses the page
 * cache blocks the event loop for the duration of the disk access. `flush()` (fdatasync,
 * milliseconds on real disks) is the exception and runs on the thread pool.
 * See README.md for the measured numbers.
 */
import * as fs from "node:fs";
import { promisify } from "node:util";
import { ErrorCode, InvalidArgumentError, IoError } from "@qimg/structs";
import type { BackendKind, BlockBackend, ReadOptions } from "./backend.js";
import { lockImageFile } from "./lock.js";
import type { ImageLock } from "./lock.js";
import {
  checkNonNegativeInt,
  checkRange,
  closedError,
  readOnlyError,
  settle,
  shortRead,
} from "./validate.js";

const fdatasync = promisify(fs.fdatasync);
const closeFd = promisify(fs.close);
const readAsync = promisify(fs.read);
const writeAsync = promisify(fs.write);
/** Requests at least this large use the thread pool instead of synchronous calls. */
const LARGE_IO = 256 * 1024;

/** Options of {@link FileBackend.open}. */
export interface FileBackendOptions {
  /** Open with O_RDONLY; writes and truncate fail with `READ_ONLY`. Default false. */
  readonly readOnly?: boolean;
  /** Create the file when it does not exist (O_CREAT). Not allowed with `readOnly`. */
  readonly create?: boolean;
  /** Truncate an existing regular file to 0 bytes on open (O_TRUNC). Not allowed with `readOnly`. */
  readonly truncate?: boolean;
  /**
   * Ignore flush requests (QEMU's `cache=unsafe`, qemu-img convert's default for its target):
   * fast, but nothing is durable until the OS writes it back. Default false.
   */
  readonly noFlush?: boolean;
  /**
   * Share every permission with other users of the file, as qemu-img's `-U` (read-only opens
   * only): the open then neither waits for nor excludes writers. Default false.
   */
  readonly forceShare?: boolean;
  /**
   * Check image locks (default true): a read-write open fails with {@link ImageLockedError}
   * while the file is open elsewhere in this process or a QEMU process uses it, and a
   * read-only open fails while it is open for writing in this process or QEMU denies reading
   * it. `false` skips the checks, as QEMU's `locking=off`. See lock.ts and the README.
   */
  readonly lock?: boolean;
  /**
   * Also hold QEMU's lock bytes where QEMU sees them, through a helper process (Perl, Linux
   * x64/arm64): a QEMU process (or another qimg) started while this backend is open then
   * refuses the image as it refuses one open in QEMU. Best effort (`locksPublished` tells);
   * costs a process start (about 10 ms) per open. Default false, or true when the
   * environment has QIMG_PUBLISH_LOCKS=1.
   */
  readonly publishLock?: boolean;
}

function describeStats(st: fs.Stats): string {
  if (st.isDirectory()) return "a directory";
  if (st.isCharacterDevice()) return "a character device";
  if (st.isFIFO()) return "a FIFO";
  if (st.isSocket()) return "a socket";
  if (st.isSymbolicLink()) return "a symbolic link";
  return "not a regular file";
}

/** "file", "block-device", or undefined for anything an image cannot live in. */
function kindOf(st: fs.Stats): "file" | "block-device" | undefined {
  if (st.isFile()) return "file";
  if (st.isBlockDevice()) return "block-device";
  return undefined;
}

function notAFile(path: string, st: fs.Stats): IoError {
  return new IoError(`${path}: is ${describeStats(st)}, not a regular file or block device`, {
    code: ErrorCode.NOT_A_FILE,
  });
}

function errnoOf(e: unknown): string | undefined {
  return typeof e === "object" && e !== null && "code" in e && typeof e.code === "string"
    ? e.code
    : undefined;
}

function systemError(path: string, what: string, e: unknown, offset?: number): IoError {
  const detail = e instanceof Error ? e.message : String(e);
  return new IoError(`${path}: ${what} failed: ${detail}`, { cause: e, offset });
}

/**
 * Size of a block device. fstat reports 0 for them, and Node has no lseek, so ask sysfs
 * (`/sys/dev/block/MAJOR:MINOR/size`, in 512-byte units) and fall back to a binary search
 * for the last readable byte.
 */
function blockDeviceSize(fd: number, st: fs.Stats): number {
  const dev = st.rdev;
  // glibc's major()/minor() encoding.
  const major =
    ((Math.floor(dev / 0x100) & 0xfff) | (Math.floor(dev / 0x100000000) & ~0xfff)) >>> 0;
  const minor = ((dev & 0xff) | (Math.floor(dev / 0x1000) & ~0xff)) >>> 0;
  try {
    const text = fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, "utf8").trim();
    const sectors = Number(text);
    if (Number.isSafeInteger(sectors * 512) && sectors >= 0) return sectors * 512;
  } catch {
    // not Linux, or no sysfs: fall through
  }
  const one = new Uint8Array(1);
  const readable = (pos: number): boolean => {
    try {
      return fs.readSync(fd, one, 0, 1, pos) === 1;
    } catch {
      return false;
    }
  };
  if (!readable(0)) return 0;
  let lo = 0; // readable
  let hi = 1;
  while (readable(hi)) {
    lo = hi;
    hi *= 2;
    if (hi > Number.MAX_SAFE_INTEGER) return lo + 1;
  }
  while (hi - lo > 1) {
    const mid = lo + Math.floor((hi - lo) / 2);
    if (readable(mid)) lo = mid;
    else hi = mid;
  }
  return lo + 1;
}

/**
 * A {@link BlockBackend} over a regular file or a block device.
 *
 * The size is read once at open and then tracked through this backend's own writes and
 * truncates (no fstat per call); changes made to the file by other processes while it is
 * open are not seen by `size()`. Reads always go to the file, so EOF handling stays exact.
 */
export class FileBackend implements BlockBackend {
  readonly readOnly: boolean;
  readonly kind: BackendKind;
  readonly name: string;
  /** The path the backend was opened with. */
  readonly path: string;
  /** True when QEMU can see this open's locks (see `publishLock`). */
  get locksPublished(): boolean {
    return this.#lock?.published ?? false;
  }

  #fd: number;
  #size: number;
  #closed = false;
  #closing: Promise<void> | undefined;
  #noFlush = false;
  #lock: ImageLock | undefined;
  readonly #inflight = new Set<Promise<unknown>>();

  private constructor(
    path: string,
    fd: number,
    kind: "file" | "block-device",
    size: number,
    readOnly: boolean,
  ) {
    this.path = path;
    this.name = path;
    this.#fd = fd;
    this.kind = kind;
    this.#size = size;
    this.readOnly = readOnly;
  }

  /**
   * Open `path`. Refuses anything that is not a regular file or block device with a
   * `NOT_A_FILE` IoError (checked before opening, so a FIFO cannot block the open, and again
   * on the opened descriptor). Open failures (ENOENT, EACCES...) become `IO` IoErrors naming
   * the path, with the system error as `cause`.
   */
  static async open(path: string, options: FileBackendOptions = {}): Promise<FileBackend> {
    if (typeof path !== "string" || path.length === 0) {
      throw new InvalidArgumentError("FileBackend.open: path must be a non-empty string");
    }
    const readOnly = options.readOnly ?? false;
    const create = options.create ?? false;
    const truncate = options.truncate ?? false;
    if (readOnly && (create || truncate)) {
      throw new InvalidArgumentError(`${path}: cannot open read-only with create or truncate`);
    }
    const forceShare = options.forceShare ?? false;
    if (forceShare && !readOnly) {
      throw new InvalidArgumentError(`${path}: forceShare can only be used with read-only opens`);
    }

    let pre: fs.Stats | undefined;
    try {
      pre = await fs.promises.stat(path);
    } catch (e) {
      if (!(create && errnoOf(e) === "ENOENT")) throw systemError(path, "open", e);
    }
    if (pre !== undefined && kindOf(pre) === undefined) throw notAFile(path, pre);

    const c = fs.constants;
    // No O_TRUNC: the file is truncated only after the lock check, so a refused open leaves a
    // file that another process uses as it was.
    const flags = readOnly ? c.O_RDONLY : c.O_RDWR | (create ? c.O_CREAT : 0);
    let fd: number;
    try {
      fd = fs.openSync(path, flags, 0o666);
    } catch (e) {
      if (errnoOf(e) === "EISDIR") {
        throw new IoError(`${path}: is a directory, not a regular file or block device`, {
          code: ErrorCode.NOT_A_FILE,
          cause: e,
        });
      }
      throw systemError(path, "open", e);
    }
    try {
      const st = fs.fstatSync(fd);
      const kind = kindOf(st);
      if (kind === undefined) throw notAFile(path, st);
      const lock =
        options.lock === false
          ? undefined
          : await lockImageFile(
              fd,
              path,
              readOnly ? (forceShare ? "read-shared" : "read") : "write",
              {
                publish: options.publishLock ?? process.env.QIMG_PUBLISH_LOCKS === "1",
              },
            );
      try {
        let size = kind === "block-device" ? blockDeviceSize(fd, st) : st.size;
        if (truncate && kind === "file" && size > 0) {
          try {
            fs.ftruncateSync(fd, 0);
          } catch (e) {
            throw systemError(path, "truncate to 0 bytes", e);
          }
          size = 0;
        }
        const backend = new FileBackend(path, fd, kind, size, readOnly);
        backend.#noFlush = options.noFlush ?? false;
        backend.#lock = lock;
        return backend;
      } catch (e) {
        await lock?.release();
        throw e;
      }
    } catch (e) {
      fs.closeSync(fd);
      if (e instanceof IoError) throw e;
      throw systemError(path, "fstat", e);
    }
  }

  read(offset: number, buf: Uint8Array, options?: ReadOptions): Promise<void> {
    if (buf.length >= LARGE_IO) return this.#readAsync(offset, buf, options);
    return settle(() => this.#readSync(offset, buf, options));
  }

  /**
   * Large transfers go through libuv's thread pool: the copy in the kernel dominates, and
   * several of them can then run on different cores at once (measured: 2 MiB requests with 4
   * in flight copy about twice as fast as synchronous calls on the 2-core machine).
   */
  async #readAsync(
    offset: number,
    buf: Uint8Array,
    options: ReadOptions | undefined,
  ): Promise<void> {
    this.#check();
    checkRange(offset, buf, this.name);
    const len = buf.length;
    let done = 0;
    while (done < len) {
      let n: number;
      try {
        n = (await readAsync(this.#fd, buf, done, len - done, offset + done)).bytesRead;
      } catch (e) {
        throw systemError(this.name, `read of ${len} bytes at offset ${offset}`, e, offset);
      }
      if (n === 0) break;
      done += n;
    }
    this.#endRead(offset, buf, done, options);
  }

  async #writeAsync(offset: number, data: Uint8Array): Promise<void> {
    this.#beginWrite(offset, data);
    const len = data.length;
    let done = 0;
    while (done < len) {
      try {
        done += (await writeAsync(this.#fd, data, done, len - done, offset + done)).bytesWritten;
      } catch (e) {
        throw systemError(this.name, `write of ${len} bytes at offset ${offset}`, e, offset);
      }
    }
    if (offset + len > this.#size && len > 0) this.#size = offset + len;
  }

  /** A short read past EOF: zeros when the caller asked for them, else a typed error. */
  #endRead(offset: number, buf: Uint8Array, done: number, options: ReadOptions | undefined): void {
    if (done >= buf.length) return;
    if (options?.zeroPastEof !== true)
      throw shortRead(this.name, offset, buf.length, Math.max(this.#size, offset + done));
    buf.fill(0, done);
  }

  #beginWrite(offset: number, data: Uint8Array): void {
    this.#check();
    if (this.readOnly) throw readOnlyError(this.name, "write");
    checkRange(offset, data, this.name);
  }

  #readSync(offset: number, buf: Uint8Array, options: ReadOptions | undefined): void {
    this.#check();
    checkRange(offset, buf, this.name);
    const len = buf.length;
    let done = 0;
    while (done < len) {
      let n: number;
      try {
        n = fs.readSync(this.#fd, buf, done, len - done, offset + done);
      } catch (e) {
        throw systemError(this.name, `read of ${len} bytes at offset ${offset}`, e, offset);
      }
      if (n === 0) break;
      done += n;
    }
    this.#endRead(offset, buf, done, options);
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    if (data.length >= LARGE_IO) return this.#writeAsync(offset, data);
    return settle(() => this.#writeSync(offset, data));
  }

  #writeSync(offset: number, data: Uint8Array): void {
    this.#beginWrite(offset, data);
    const len = data.length;
    let done = 0;
    while (done < len) {
      try {
        done += fs.writeSync(this.#fd, data, done, len - done, offset + done);
      } catch (e) {
        throw systemError(this.name, `write of ${len} bytes at offset ${offset}`, e, offset);
      }
    }
    if (offset + len > this.#size && len > 0) this.#size = offset + len;
  }

  async flush(): Promise<void> {
    this.#check();
    if (this.readOnly || this.#noFlush) return; // nothing of ours to make durable / cache=unsafe
    const p = fdatasync(this.#fd);
    this.#inflight.add(p);
    try {
      await p;
    } catch (e) {
      throw systemError(this.name, "flush (fdatasync)", e);
    } finally {
      this.#inflight.delete(p);
    }
  }

  size(): Promise<number> {
    return settle(() => {
      this.#check();
      return this.#size;
    });
  }

  truncate(size: number): Promise<void> {
    return settle(() => this.#truncateSync(size));
  }

  #truncateSync(size: number): void {
    this.#check();
    if (this.readOnly) throw readOnlyError(this.name, "truncate");
    checkNonNegativeInt(size, "size", this.name);
    if (this.kind === "block-device") {
      if (size === this.#size) return;
      throw new IoError(
        `${this.name}: cannot resize a block device from ${this.#size} to ${size} bytes`,
      );
    }
    try {
      fs.ftruncateSync(this.#fd, size);
    } catch (e) {
      throw systemError(this.name, `truncate to ${size} bytes`, e);
    }
    this.#size = size;
  }

  /** Close the descriptor after any in-flight flush settles. Idempotent. */
  close(): Promise<void> {
    if (this.#closing !== undefined) return this.#closing;
    this.#closed = true;
    const pending = [...this.#inflight];
    this.#closing = Promise.allSettled(pending).then(async () => {
      await this.#lock?.release();
      try {
        await closeFd(this.#fd);
      } catch (e) {
        throw systemError(this.name, "close", e);
      }
    });
    return this.#closing;
  }

  #check(): void {
    if (this.#closed) throw closedError(this.name);
  }
}
