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

  private constructor(
    readonly backend: BlockBackend,
    readonly virtualSize: number,
  ) {}

  get readOnly(): boolean {
    return this.backend.readOnly;
  }

  static async open(backend: BlockBackend): Promise<RawImage> {
    return new RawImage(backend, await backend.size());
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    checkRange(offset, buf.length, this.virtualSize);
    await this.backend.read(offset, buf, { zeroPastEof: true });
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    checkRange(offset, data.length, this.virtualSize);
    await this.backend.write(offset, data);
  }

  async flush(): Promise<void> {
    await this.backend.flush();
  }

  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    checkRange(offset, length, this.virtualSize);
    return Promise.resolve({
      offset,
      length,
      present: true,
      zero: false,
      data: true,
      depth: 0,
      hostOffset: offset,
      file: this.backend.name,
    });
  }

  async close(): Promise<void> {
    await this.backend.close();
  }
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
