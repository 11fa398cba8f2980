import { InvalidArgumentError } from "@qimg/structs";
import type { BlockBackend } from "./backend.js";
import type { BlockStatus, DiskImage } from "./image.js";

/**
 * A raw image: guest bytes are file bytes. Reading past the end of the file (a raw backing
 * file shorter than its overlay's view of it) reads zeros.
 */
export class RawImage implements DiskImage {
  readonly format = "raw";
  readonly backing = undefined;
  private scratch: Uint8Array | undefined;
  /** True while a blockStatus call scans through `scratch` (calls may overlap). */
  private scratchBusy = false;

  private constructor(
    readonly backend: BlockBackend,
    readonly virtualSize: number,
  ) {}

  /** True when the backend is read-only. */
  get readOnly(): boolean {
    return this.backend.readOnly;
  }

  /**
   * The virtual size is the file size rounded up to a whole 512-byte sector, as QEMU's block
   * layer sees a raw file (`qemu-img info` of a 1000-byte file says 1024 bytes); the partial
   * sector's missing tail reads as zeros.
   */
  static async open(backend: BlockBackend): Promise<RawImage> {
    const size = await backend.size();
    return new RawImage(backend, Math.ceil(size / SECTOR) * SECTOR);
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    checkRange(offset, buf.length, this.virtualSize);
    await this.backend.read(offset, buf, { zeroPastEof: true });
  }

  /** Write guest bytes: a raw image's guest bytes are the file's bytes. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    checkRange(offset, data.length, this.virtualSize);
    await this.backend.write(offset, data);
  }

  /** Sync the backend. */
  async flush(): Promise<void> {
    await this.backend.flush();
  }

  /**
   * Raw files have no allocation metadata; like a file system's holes, runs of 4 KiB blocks
   * that read as zeros are reported as zero (and not data), the rest as data.
   */
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    checkRange(offset, length, this.virtualSize);
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
    await this.backend.close();
  }
}

const SECTOR = 512;
const SCAN_BLOCK = 4096;
const SCAN_CHUNK = 1024 * 1024;

function isZero(b: Uint8Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (b[i] !== 0) return false;
  return true;
}

function checkRange(offset: number, length: number, size: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new InvalidArgumentError(`invalid request: offset ${offset}, length ${length}`);
  }
  if (offset + length > size) {
    throw new InvalidArgumentError(
      `request [${offset}, +${length}) is past the end of the ${size}-byte image`,
    );
  }
}
