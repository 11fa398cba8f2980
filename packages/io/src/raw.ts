import type { BlockBackend } from "./backend.js";
import type { BlockStatus, WritableDiskImage, WriteZeroesOptions } from "./image.js";
import { checkRequest, imageClosedError, imageReadOnlyError } from "./request.js";

/**
 * A raw image: guest bytes are file bytes. Reading past the end of the file (a raw backing
 * file shorter than its overlay's view of it) reads zeros. Zero writes and discards write
 * zero bytes (a raw file has no metadata to record them in).
 */
export class RawImage implements WritableDiskImage {
  readonly format = "raw";
  readonly backing = undefined;
  /** Raw files have no clusters: the allocation unit is a 512-byte sector. */
  readonly clusterSize = SECTOR;
  /** True when opened read-only (the default): writes, zero writes, discards and resizes are refused. */
  readonly readOnly: boolean;
  #closed = false;
  private scratch: Uint8Array | undefined;
  /** True while a blockStatus call scans through `scratch` (calls may overlap). */
  private scratchBusy = false;

  #virtualSize: number;

  private constructor(
    readonly backend: BlockBackend,
    virtualSize: number,
    readOnly: boolean,
  ) {
    this.#virtualSize = virtualSize;
    this.readOnly = readOnly;
  }

  /** The file size rounded up to a whole 512-byte sector (see {@link RawImage.open}). */
  get virtualSize(): number {
    return this.#virtualSize;
  }

  /**
   * Open `backend` as a raw image, read-only unless `options.readOnly` is false (as every
   * driver). A read-write open of a read-only backend is refused.
   *
   * The virtual size is the file size rounded up to a whole 512-byte sector, as QEMU's block
   * layer sees a raw file (`qemu-img info` of a 1000-byte file says 1024 bytes); the partial
   * sector's missing tail reads as zeros.
   */
  static async open(
    backend: BlockBackend,
    options: { readonly readOnly?: boolean | undefined } = {},
  ): Promise<RawImage> {
    const readOnly = options.readOnly !== false;
    if (!readOnly && backend.readOnly) {
      throw imageReadOnlyError(backend.name, "cannot open read/write: the file is read-only");
    }
    const size = await backend.size();
    return new RawImage(backend, Math.ceil(size / SECTOR) * SECTOR, readOnly);
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.#checkOpen();
    checkRequest(offset, buf.length, this.virtualSize, "image");
    await this.backend.read(offset, buf, { zeroPastEof: true });
  }

  /** Write guest bytes: a raw image's guest bytes are the file's bytes. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.#checkWritable();
    checkRequest(offset, data.length, this.virtualSize, "image");
    await this.backend.write(offset, data);
  }

  /** Write zero bytes (`mayUnmap` changes nothing: the file keeps its blocks). */
  async writeZeroes(offset: number, length: number, _options?: WriteZeroesOptions): Promise<void> {
    this.#checkWritable();
    checkRequest(offset, length, this.virtualSize, "image");
    if (length === 0) return;
    const zero = new Uint8Array(Math.min(ZERO_CHUNK, length));
    for (let pos = offset; pos < offset + length; pos += zero.length) {
      const n = Math.min(zero.length, offset + length - pos);
      await this.backend.write(pos, n === zero.length ? zero : zero.subarray(0, n));
    }
  }

  /** Discarded bytes of a raw image read as zeros: they are written as zeros. */
  async discard(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  /**
   * Truncate (or extend) the file to `newSize` bytes: growing adds zeros, shrinking drops the
   * tail. The virtual size is the new size rounded up to a sector.
   */
  async resize(newSize: number): Promise<void> {
    this.#checkWritable();
    checkRequest(0, newSize, Number.MAX_SAFE_INTEGER, "image");
    await this.backend.truncate(newSize);
    this.#virtualSize = Math.ceil(newSize / SECTOR) * SECTOR;
  }

  /** Sync the backend. */
  async flush(): Promise<void> {
    this.#checkOpen();
    await this.backend.flush();
  }

  /**
   * Raw files have no allocation metadata; like a file system's holes, runs of 4 KiB blocks
   * that read as zeros are reported as zero (and not data), the rest as data.
   */
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.#checkOpen();
    checkRequest(offset, length, this.virtualSize, "image");
    // One scan buffer, reused; a call that overlaps another in flight gets its own (sharing it
    // let one call classify the bytes another had read into it).
    const own = !this.scratchBusy;
    const buf = own ? (this.scratch ??= new Uint8Array(SCAN_CHUNK)) : new Uint8Array(SCAN_CHUNK);
    if (own) this.scratchBusy = true;
    try {
      return await this.scan(offset, length, buf);
    } finally {
      if (own) this.scratchBusy = false;
    }
  }

  private async scan(offset: number, length: number, buf: Uint8Array): Promise<BlockStatus> {
    let pos = offset;
    const end = offset + length;
    let zero: boolean | undefined;
    while (pos < end) {
      const n = Math.min(SCAN_CHUNK, end - pos);
      const chunk = buf.subarray(0, n);
      await this.backend.read(pos, chunk, { zeroPastEof: true });
      let i = 0;
      for (; i < n; i += SCAN_BLOCK) {
        const blockZero = isZero(chunk, i, Math.min(n, i + SCAN_BLOCK));
        if (zero === undefined) zero = blockZero;
        else if (zero !== blockZero) break;
      }
      pos += Math.min(i, n);
      if (i < n) break;
    }
    const isZ = zero ?? true;
    return {
      offset,
      length: pos - offset,
      present: true,
      zero: isZ,
      data: !isZ,
      depth: 0,
      hostOffset: offset,
      file: this.backend.name,
    };
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.backend.close();
  }

  #checkOpen(): void {
    if (this.#closed) throw imageClosedError(this.backend.name);
  }

  #checkWritable(): void {
    this.#checkOpen();
    if (this.readOnly) throw imageReadOnlyError(this.backend.name);
  }
}

const SECTOR = 512;
const SCAN_BLOCK = 4096;
const SCAN_CHUNK = 1024 * 1024;
/** Zero writes go out in chunks of at most this many bytes. */
const ZERO_CHUNK = 1024 * 1024;

function isZero(b: Uint8Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (b[i] !== 0) return false;
  return true;
}
