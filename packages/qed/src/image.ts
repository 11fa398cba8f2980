/**
 * The QED driver: reads, writes, zero writes and block status over a {@link BlockBackend},
 * following QEMU's block/qed.c in what reaches the disk and in which order.
 *
 * Allocation: data clusters, then (when the range has no L2 table yet) a new L2 table, are
 * appended at the end of the file. The L2 entry is updated only after the data is written;
 * a new L2 table is written and flushed before the L1 entry points to it. Without a backing
 * file the need-check bit is set (header rewrite + flush) before the first allocating write
 * touches the disk, so a crash is repaired by the check on the next open; with a backing file
 * the data is flushed before the L2 update instead (QEMU's choice), so no check is needed.
 * Allocations in the range of one L2 table are serialized; others run in parallel; writes
 * to allocated clusters go straight to the file and never wait.
 */
import { ClusterCache } from "@qimg/cluster-cache";
import {
  Mutex,
  RangeClaims,
  backingNotOpenedError,
  checkRequest,
  imageClosedError,
  imageReadOnlyError,
  noBackingOpenerError,
} from "@qimg/io";
import type {
  BlockBackend,
  BlockStatus,
  DiskImage,
  WritableDiskImage,
  WriteZeroesOptions,
} from "@qimg/io";
import {
  CorruptImageError,
  FormatError,
  InvalidArgumentError,
  UnsupportedFeatureError,
  hex,
} from "@qimg/structs";
import {
  QED_CLUSTER_ZERO,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_F_NEED_CHECK,
  QED_KNOWN_AUTOCLEAR_FEATURES,
  QED_NEED_CHECK_TIMEOUT_MS,
  QED_SECTOR_SIZE,
  isValidImageSize,
  maxImageSize,
} from "./spec/constants.js";
import {
  QED_HEADER_SIZE,
  decodeQedHeader,
  encodeQedHeader,
  validateQedHeader,
} from "./spec/header.js";
import type { QedHeader } from "./spec/header.js";
import { planQedBackingChange } from "./backing.js";
import type { QedBackingChange } from "./backing.js";
import {
  QED_ENTRY_TOO_LARGE,
  QedTable,
  classifyL1Entry,
  classifyL2Entry,
  qedFileSize,
} from "./spec/table.js";
import type { QedGeometry } from "./spec/table.js";
import { referencesTornCluster, tornClusterGrown, tornClusterReferences, walkQed } from "./walk.js";
import type {
  QedCheckOptions,
  QedCheckResult,
  QedInfo,
  QedOpenOptions,
  QedTimer,
} from "./types.js";

type Mutable<T> = { -readonly [K in keyof T]: T[K] };

/** A contiguous run of guest bytes with one kind of mapping, inside one L2 table. */
interface Run {
  readonly kind: "data" | "zero" | "unallocated";
  /** Host offset of the first byte (data only). */
  readonly host: number;
  readonly length: number;
}

const defaultTimer: QedTimer = {
  set(callback, ms) {
    const t = setTimeout(callback, ms) as unknown as { unref?: () => void };
    t.unref?.();
    return t;
  },
  clear(handle) {
    clearTimeout(handle as Parameters<typeof clearTimeout>[0]);
  },
};

/**
 * The backend as the table cache sees it: bytes of a torn last sector read as zeros, as
 * QEMU's block layer reads them (a table may end in it).
 */
function zeroPastEofReader(backend: BlockBackend): BlockBackend {
  return {
    get readOnly() {
      return backend.readOnly;
    },
    get kind() {
      return backend.kind;
    },
    get name() {
      return backend.name;
    },
    read: (offset, buf) => backend.read(offset, buf, { zeroPastEof: true }),
    write: (offset, data) => backend.write(offset, data),
    flush: () => backend.flush(),
    size: () => backend.size(),
    truncate: (size) => backend.truncate(size),
    close: () => backend.close(),
  };
}

/** Largest zero buffer written at once when zeroing allocated clusters in place. */
const ZERO_CHUNK = 4 * 1024 * 1024;

/** A QED image opened by {@link openQed}. */
export class QedImage implements WritableDiskImage {
  readonly format = "qed";
  readonly backend: BlockBackend;
  readonly readOnly: boolean;
  backing: DiskImage | undefined;

  readonly #h: Mutable<QedHeader>;
  readonly #cs: number;
  readonly #entries: number;
  readonly #l1: QedTable;
  readonly #cache: ClusterCache;
  readonly #views = new WeakMap<Uint8Array, QedTable>();
  #backingFilename: string | undefined;
  #backingFormat: string | undefined;
  /** Opened with `noBacking`: the image reads as if it had no backing file (QEMU's BDRV_O_NO_BACKING). */
  readonly #noBacking: boolean;
  readonly #delay: number;
  readonly #timer: QedTimer;
  #fileSize: number;
  /**
   * The real size of the file while its last cluster is torn (the file ends inside the
   * cluster at `#fileSize`) and it is not yet known whether a table entry points into it;
   * undefined otherwise.
   */
  #tornSize: number | undefined;
  #resolvingTorn: Promise<void> | undefined;
  #closed = false;

  /** L2 tables (by L1 index) with an allocation in flight: allocations in one table take turns. */
  readonly #tableLocks = new RangeClaims();
  /** Guest clusters with a write in flight (FIFO: overlapping writes wait for earlier ones). */
  readonly #claims = new RangeClaims();
  /** Metadata writes (header, table sectors) one at a time. */
  readonly #meta = new Mutex();
  #allocInFlight = 0;
  #needCheckDurable: boolean;
  #settingNeedCheck: Promise<void> | undefined;
  #plug: Promise<void> | undefined;
  #timerHandle: unknown;
  #timerArmed = false;

  /** @internal use {@link openQed}. */
  constructor(
    backend: BlockBackend,
    header: QedHeader,
    l1: Uint8Array,
    fileSize: number,
    backingFilename: string | undefined,
    readOnly: boolean,
    options: QedOpenOptions,
    realSize: number = fileSize,
  ) {
    this.backend = backend;
    this.readOnly = readOnly;
    this.#h = { ...header };
    this.#cs = header.clusterSize;
    this.#entries = (header.tableSize * header.clusterSize) / 8;
    this.#l1 = new QedTable(l1);
    this.#fileSize = fileSize;
    this.#tornSize = realSize > fileSize ? realSize : undefined;
    this.#backingFilename = backingFilename;
    this.#backingFormat =
      backingFilename !== undefined && (header.features & QED_F_BACKING_FORMAT_NO_PROBE) !== 0n
        ? "raw"
        : undefined;
    this.#noBacking = options.noBacking === true;
    this.#needCheckDurable = (header.features & QED_F_NEED_CHECK) !== 0n;
    this.#delay = options.needCheckClearDelayMs ?? QED_NEED_CHECK_TIMEOUT_MS;
    this.#timer = options.timer ?? defaultTimer;
    const tableBytes = header.tableSize * header.clusterSize;
    const capacity =
      options.l2CacheCapacity ??
      Math.max(2, Math.min(50, Math.floor((64 * 1024 * 1024) / tableBytes)));
    this.#cache = new ClusterCache({
      backend: zeroPastEofReader(backend),
      tableSize: tableBytes,
      capacity,
      name: "QED L2",
    });
  }

  // ---------------------------------------------------------------- facts

  get virtualSize(): number {
    return this.#h.imageSize;
  }

  /** Cluster size in bytes, from the header. */
  get clusterSize(): number {
    return this.#cs;
  }

  /** The need-check bit as currently held (and, outside transitions, on disk). */
  get needCheck(): boolean {
    return (this.#h.features & QED_F_NEED_CHECK) !== 0n;
  }

  /** A copy of the current header. */
  get header(): QedHeader {
    return { ...this.#h };
  }

  /**
   * Offset where the next cluster will be allocated: QEMU's `file_size` (the file size rounded
   * up to a sector and down to a cluster) plus allocations — or past a torn last cluster that
   * a table entry points into, once the first allocation has looked.
   */
  get fileEnd(): number {
    return this.#fileSize;
  }

  /** What `qemu-img info` shows of this image (sizes, backing file, need-check bit). */
  info(): QedInfo {
    return {
      virtualSize: this.#h.imageSize,
      clusterSize: this.#cs,
      tableSize: this.#h.tableSize,
      headerSize: this.#h.headerSize,
      ...(this.#backingFilename === undefined ? {} : { backingFilename: this.#backingFilename }),
      ...(this.#backingFormat === undefined ? {} : { backingFormat: this.#backingFormat }),
      needCheck: this.needCheck,
      features: this.#h.features,
      compatFeatures: this.#h.compatFeatures,
      autoclearFeatures: this.#h.autoclearFeatures,
    };
  }

  #geometry(): QedGeometry {
    return {
      clusterSize: this.#cs,
      tableSize: this.#h.tableSize,
      headerSize: this.#h.headerSize,
      fileSize: this.#fileSize,
    };
  }

  // ---------------------------------------------------------------- lookup

  #view(bytes: Uint8Array): QedTable {
    let v = this.#views.get(bytes);
    if (v === undefined) {
      v = new QedTable(bytes);
      this.#views.set(bytes, v);
    }
    return v;
  }

  async #l2(offset: number): Promise<QedTable> {
    const hit = this.#cache.peek(offset);
    if (hit !== undefined) return this.#view(hit.bytes);
    const t = await this.#cache.get(offset);
    this.#cache.release(t);
    return this.#view(t.bytes);
  }

  /** The run of same-kind clusters starting at guest offset `pos`, at most `maxLen` bytes, inside one L2 table. */
  async #findRun(pos: number, maxLen: number): Promise<Run> {
    const cs = this.#cs;
    const span = cs * this.#entries;
    const l1i = Math.floor(pos / span);
    const limit = Math.min(maxLen, (l1i + 1) * span - pos);
    const g = this.#geometry();
    const l1v = this.#l1.get(l1i);
    const k1 = classifyL1Entry(l1v, g);
    if (k1 === "unallocated") return { kind: "unallocated", host: 0, length: limit };
    if (k1 === "invalid") {
      throw new CorruptImageError(
        `QED L1 entry ${l1i} points to an L2 table at ${l1v === QED_ENTRY_TOO_LARGE ? "a value above 2^53-1" : hex(l1v)}, ` +
          `which is not cluster aligned or not inside the ${hex(g.fileSize)}-byte file`,
        { offset: this.#h.l1TableOffset + l1i * 8 },
      );
    }
    const table = await this.#l2(l1v);
    let j = Math.floor(pos / cs) % this.#entries;
    const inCluster = pos % cs;
    const v = table.get(j);
    const k = classifyL2Entry(v, g);
    if (k === "invalid") {
      throw new CorruptImageError(
        `QED L2 table at ${hex(l1v)} entry ${j} points to a data cluster at ${v === QED_ENTRY_TOO_LARGE ? "a value above 2^53-1" : hex(v)}, ` +
          `which is not cluster aligned or not inside the ${hex(g.fileSize)}-byte file`,
        { offset: l1v + j * 8 },
      );
    }
    let len = cs - inCluster;
    let prev = v;
    while (len < limit) {
      j++;
      const next = table.get(j);
      if (k === "offset") {
        if (next !== prev + cs || !(next < g.fileSize)) break;
        prev = next;
      } else if (next !== v) {
        break;
      }
      len += cs;
    }
    const length = Math.min(len, limit);
    if (k === "offset") return { kind: "data", host: v + inCluster, length };
    return { kind: k === "zero" ? "zero" : "unallocated", host: 0, length };
  }

  // ---------------------------------------------------------------- read

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.#checkOpen();
    checkRequest(offset, buf.length, this.#h.imageSize, "QED image");
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const run = await this.#findRun(pos, buf.length - done);
      const sub = buf.subarray(done, done + run.length);
      if (run.kind === "data") await this.backend.read(run.host, sub, { zeroPastEof: true });
      else if (run.kind === "zero") sub.fill(0);
      else await this.#readBacking(pos, sub);
      done += run.length;
    }
  }

  /** Guest bytes below this image: the backing file (zeros past its end), or zeros. */
  async #readBacking(pos: number, buf: Uint8Array): Promise<void> {
    const backing = this.backing;
    if (backing === undefined) {
      if (this.#backingFilename !== undefined && !this.#noBacking) {
        throw backingNotOpenedError(this.backend.name, this.#backingFilename);
      }
      buf.fill(0);
      return;
    }
    const n = Math.max(0, Math.min(buf.length, backing.virtualSize - pos));
    if (n > 0) await backing.read(pos, buf.subarray(0, n));
    buf.fill(0, n);
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.#checkOpen();
    checkRequest(offset, length, this.#h.imageSize, "QED image");
    if (length === 0) throw new InvalidArgumentError(`block status of an empty range at ${offset}`);
    const run = await this.#findRun(offset, length);
    if (run.kind === "data") {
      return {
        offset,
        length: run.length,
        present: true,
        zero: false,
        data: true,
        depth: 0,
        hostOffset: run.host,
        file: this.backend.name,
      };
    }
    if (run.kind === "zero") {
      return { offset, length: run.length, present: true, zero: true, data: false, depth: 0 };
    }
    const backing = this.backing;
    if (backing === undefined) {
      // No backing file: unallocated reads as zeros. Backing file not opened: nothing known.
      const zero = this.#backingFilename === undefined;
      return { offset, length: run.length, present: false, zero, data: false, depth: 0 };
    }
    if (offset >= backing.virtualSize) {
      return { offset, length: run.length, present: false, zero: true, data: false, depth: 0 };
    }
    const below = await backing.blockStatus(
      offset,
      Math.min(run.length, backing.virtualSize - offset),
    );
    return { ...below, offset, depth: below.depth + 1 };
  }

  // ---------------------------------------------------------------- write

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.#checkWritable();
    checkRequest(offset, data.length, this.#h.imageSize, "QED image");
    if (data.length === 0) return;
    await this.#withClusters(offset, data.length, () => this.#writeClaimed(offset, data));
  }

  /**
   * Run `fn` holding the clusters of [offset, offset + length), so that overlapping requests
   * in flight take effect in the order they were issued (a write issued later never lands
   * under one issued earlier), as qcow2's driver does.
   */
  #withClusters(offset: number, length: number, fn: () => Promise<void>): Promise<void> {
    const cs = this.#cs;
    const first = Math.floor(offset / cs);
    return this.#claims.run(first, Math.floor((offset + length - 1) / cs), fn);
  }

  /** `write` once the range is claimed. */
  async #writeClaimed(offset: number, data: Uint8Array): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const run = await this.#findRun(pos, data.length - done);
      if (run.kind === "data") {
        await this.backend.write(run.host, data.subarray(done, done + run.length));
        done += run.length;
      } else {
        done += await this.#allocatingWrite(pos, data.length - done, data.subarray(done));
      }
    }
  }

  /**
   * Make the range read as zeros: whole clusters become zero clusters (allocated ones are
   * zeroed in place, as QEMU's QED does); `mayUnmap` changes nothing (QED cannot release
   * clusters).
   */
  async writeZeroes(offset: number, length: number, _options?: WriteZeroesOptions): Promise<void> {
    this.#checkWritable();
    checkRequest(offset, length, this.#h.imageSize, "QED image");
    if (length === 0) return;
    await this.#withClusters(offset, length, () => this.#writeZeroesClaimed(offset, length));
  }

  /** `writeZeroes` once the range is claimed. */
  async #writeZeroesClaimed(offset: number, length: number): Promise<void> {
    const cs = this.#cs;
    const end = offset + length;
    const alignedStart = Math.ceil(offset / cs) * cs;
    const alignedEnd = Math.floor(end / cs) * cs;
    if (alignedStart >= alignedEnd) {
      await this.#writeClaimed(offset, new Uint8Array(length));
      return;
    }
    // Like QEMU's block layer: unaligned head and tail are written as data, whole clusters
    // become zero clusters (allocated clusters are zeroed in place, as QEMU's QED does).
    if (offset < alignedStart) {
      await this.#writeClaimed(offset, new Uint8Array(alignedStart - offset));
    }
    let pos = alignedStart;
    while (pos < alignedEnd) {
      const run = await this.#findRun(pos, alignedEnd - pos);
      if (run.kind === "data") {
        await this.#zeroInPlace(run.host, run.length);
        pos += run.length;
      } else if (run.kind === "zero") {
        pos += run.length;
      } else {
        pos += await this.#allocatingWrite(pos, alignedEnd - pos, undefined);
      }
    }
    if (alignedEnd < end) await this.#writeClaimed(alignedEnd, new Uint8Array(end - alignedEnd));
  }

  async #zeroInPlace(host: number, length: number): Promise<void> {
    const zeros = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; done += zeros.length) {
      const n = Math.min(zeros.length, length - done);
      await this.backend.write(host + done, n === zeros.length ? zeros : zeros.subarray(0, n));
    }
  }

  /**
   * Allocate for the run at `pos` (at most `maxLen` bytes), holding the lock of its L2 table.
   * `data` undefined means a zero write of whole clusters. Returns the bytes handled.
   */
  async #allocatingWrite(
    pos: number,
    maxLen: number,
    data: Uint8Array | undefined,
  ): Promise<number> {
    const cs = this.#cs;
    const l1i = Math.floor(pos / (cs * this.#entries));
    return await this.#tableLocks.run(l1i, l1i, async () => {
      // Look again: another allocation may have filled this range while we waited.
      const run = await this.#findRun(pos, maxLen);
      if (run.kind === "data") {
        if (data === undefined) await this.#zeroInPlace(run.host, run.length);
        else await this.backend.write(run.host, data.subarray(0, run.length));
        return run.length;
      }
      if (data === undefined && run.kind === "zero") return run.length;
      const inCluster = pos % cs;
      const n = Math.ceil((inCluster + run.length) / cs);
      const firstIndex = Math.floor(pos / cs) % this.#entries;
      await this.#beginAlloc();
      try {
        let target: number;
        if (data === undefined) {
          target = QED_CLUSTER_ZERO;
        } else {
          target = this.#fileSize;
          this.#fileSize += n * cs;
          const buf = new Uint8Array(n * cs);
          const clusterStart = pos - inCluster;
          // Copy-on-write the untouched head and tail: from the backing file for unallocated
          // clusters, zeros for zero clusters (QEMU 7.2 copies from the backing file even for
          // zero clusters, which resurrects stale backing data; qimg does not).
          if (run.kind === "unallocated") {
            if (inCluster > 0) await this.#readBacking(clusterStart, buf.subarray(0, inCluster));
            const tail = inCluster + run.length;
            if (tail < buf.length) await this.#readBacking(clusterStart + tail, buf.subarray(tail));
          }
          buf.set(data.subarray(0, run.length), inCluster);
          await this.backend.write(target, buf);
          // With a backing file a crash must never leave an L2 entry pointing at an unwritten
          // cluster (the backing data there would be lost), so flush before the L2 update.
          if (this.backing !== undefined) await this.backend.flush();
        }
        await this.#updateL2(l1i, firstIndex, n, target);
      } finally {
        this.#endAlloc();
      }
      return run.length;
    });
  }

  async #updateL2(l1i: number, firstIndex: number, n: number, target: number): Promise<void> {
    const cs = this.#cs;
    const fill = (t: QedTable): void => {
      for (let i = 0; i < n; i++)
        t.set(firstIndex + i, target === QED_CLUSTER_ZERO ? target : target + i * cs);
    };
    const l1v = this.#l1.get(l1i);
    if (l1v === 0) {
      const l2off = this.#fileSize;
      this.#fileSize += this.#h.tableSize * cs;
      const t = await this.#cache.getEmpty(l2off);
      try {
        fill(this.#view(t.bytes));
        await this.backend.write(l2off, t.bytes.slice());
        // The new table must be durable before the L1 entry points at it.
        await this.backend.flush();
        this.#l1.set(l1i, l2off);
        await this.#writeTableSectors(this.#h.l1TableOffset, this.#l1.bytes, l1i, 1);
      } finally {
        this.#cache.release(t);
      }
    } else {
      const t = await this.#cache.get(l1v);
      try {
        fill(this.#view(t.bytes));
        await this.#writeTableSectors(l1v, t.bytes, firstIndex, n);
      } finally {
        this.#cache.release(t);
      }
    }
  }

  /** Write the 512-byte sectors holding entries [first, first+n) of a table (serialized, from a snapshot). */
  async #writeTableSectors(
    tableOffset: number,
    bytes: Uint8Array,
    first: number,
    n: number,
  ): Promise<void> {
    const start = Math.floor((first * 8) / QED_SECTOR_SIZE) * QED_SECTOR_SIZE;
    const end = Math.min(
      bytes.length,
      Math.ceil(((first + n) * 8) / QED_SECTOR_SIZE) * QED_SECTOR_SIZE,
    );
    await this.#serialMeta(() => this.backend.write(tableOffset + start, bytes.slice(start, end)));
  }

  /** Run metadata writes one at a time so sectors shared by concurrent updates land in order. */
  #serialMeta(fn: () => Promise<void>): Promise<void> {
    return this.#meta.run(fn);
  }

  async #writeHeader(): Promise<void> {
    await this.#serialMeta(() => this.backend.write(0, encodeQedHeader(this.#h)));
  }

  // ---------------------------------------------------------------- need-check

  async #beginAlloc(): Promise<void> {
    while (this.#plug !== undefined) await this.#plug;
    this.#allocInFlight++;
    this.#cancelTimer();
    try {
      if (this.backing === undefined && !this.#needCheckDurable) {
        this.#settingNeedCheck ??= (async () => {
          this.#h.features |= QED_F_NEED_CHECK;
          try {
            await this.#writeHeader();
            await this.backend.flush();
            this.#needCheckDurable = true;
          } finally {
            this.#settingNeedCheck = undefined;
          }
        })();
        await this.#settingNeedCheck;
      }
      if (this.#tornSize !== undefined) {
        this.#resolvingTorn ??= this.#resolveTorn().finally(() => {
          this.#resolvingTorn = undefined;
        });
        await this.#resolvingTorn;
      }
    } catch (e) {
      this.#endAlloc();
      throw e;
    }
  }

  /**
   * The file ends inside the cluster at `#fileSize`. When a table entry points into that
   * cluster, its bytes are in use: allocations start past it (and the entry becomes valid,
   * reading the bytes still there and zeros after them). Otherwise allocations reuse it, as
   * QEMU's do.
   */
  async #resolveTorn(): Promise<void> {
    const size = this.#tornSize;
    if (size === undefined) return;
    const g = this.#geometry();
    if (await referencesTornCluster(g, size, this.#l1, async (o) => (await this.#l2(o)).bytes)) {
      this.#fileSize = Math.ceil(size / this.#cs) * this.#cs;
    }
    this.#tornSize = undefined;
  }

  #endAlloc(): void {
    this.#allocInFlight--;
    if (this.#allocInFlight === 0 && this.needCheck && !this.#closed) {
      this.#cancelTimer();
      this.#timerArmed = true;
      this.#timerHandle = this.#timer.set(() => this.#onTimer(), this.#delay);
    }
  }

  #cancelTimer(): void {
    if (this.#timerArmed) {
      this.#timer.clear(this.#timerHandle);
      this.#timerArmed = false;
      this.#timerHandle = undefined;
    }
  }

  #onTimer(): void {
    this.#timerArmed = false;
    this.#timerHandle = undefined;
    if (this.#allocInFlight > 0 || this.#closed || this.#plug !== undefined || !this.needCheck)
      return;
    const p = this.#clearNeedCheck().catch(() => {
      // Like QEMU: a failed clean leaves the bit set; the next open checks the image.
    });
    this.#plug = p;
    void p.finally(() => {
      if (this.#plug === p) this.#plug = undefined;
    });
  }

  /** Flush, clear the need-check bit, write the header, flush. */
  async #clearNeedCheck(): Promise<void> {
    await this.backend.flush();
    this.#h.features &= ~QED_F_NEED_CHECK;
    this.#needCheckDurable = false;
    try {
      await this.#writeHeader();
    } catch (e) {
      this.#h.features |= QED_F_NEED_CHECK;
      this.#needCheckDurable = true;
      throw e;
    }
    await this.backend.flush();
  }

  /** Resolves when background work (clearing the need-check bit) has finished. */
  async whenIdle(): Promise<void> {
    while (this.#plug !== undefined) await this.#plug;
  }

  // ---------------------------------------------------------------- misc operations

  /** QEMU's QED driver has no discard: the request is accepted and does nothing. */
  async discard(offset: number, length: number): Promise<void> {
    this.#checkWritable();
    checkRequest(offset, length, this.#h.imageSize, "QED image");
    await Promise.resolve();
  }

  async flush(): Promise<void> {
    this.#checkOpen();
    if (this.readOnly) return;
    await this.backend.flush();
  }

  /** Grow the virtual size (a multiple of 512, within what the tables can map). Shrinking is refused, as in QEMU. */
  async resize(newSize: number): Promise<void> {
    this.#checkWritable();
    if (!isValidImageSize(newSize, this.#cs, this.#h.tableSize)) {
      throw new InvalidArgumentError(
        `invalid QED image size ${newSize}: it must be a multiple of ${QED_SECTOR_SIZE} no larger than ${maxImageSize(this.#cs, this.#h.tableSize)}`,
      );
    }
    if (newSize < this.#h.imageSize) {
      throw new InvalidArgumentError(
        `shrinking QED images is not supported (from ${this.#h.imageSize} to ${newSize} bytes)`,
      );
    }
    const old = this.#h.imageSize;
    // Growing over a backing file that reaches past the old end would show its data in the new
    // area; QED has no way to zero that area in the truncate, so QEMU refuses such a resize
    // (its block layer asks for zeroed growth, which the QED driver does not support).
    const backingEnd =
      this.backing !== undefined
        ? this.backing.virtualSize
        : this.#backingFilename !== undefined
          ? newSize
          : 0;
    if (newSize > old && backingEnd > old) {
      throw new UnsupportedFeatureError(
        `Block driver does not support requested flags: growing from ${old} bytes would show the backing file's data past the old end, and QED cannot zero it`,
        ["zeroed growth"],
      );
    }
    this.#h.imageSize = newSize;
    try {
      await this.#writeHeader();
      await this.backend.flush();
    } catch (e) {
      this.#h.imageSize = old;
      throw e;
    }
  }

  /**
   * Walk the tables (see {@link checkQed}). With `repair`, invalid entries are cleared and,
   * when nothing unfixable remains, the need-check bit is cleared. Do not run it while other
   * requests are in flight.
   */
  async check(options: QedCheckOptions = {}): Promise<QedCheckResult> {
    this.#checkOpen();
    const repair = options.repair === true;
    if (repair) this.#checkWritable();
    let grown: { offset: number; size: number } | undefined;
    if (repair && this.#tornSize !== undefined) {
      const size = this.#tornSize;
      const offset = this.#fileSize;
      const g = this.#geometry();
      const refs = await tornClusterReferences(
        g,
        size,
        this.#l1,
        async (o) => (await this.#l2(o)).bytes,
      );
      // One entry points into the torn cluster: grow it (keeping its bytes). Several: leave
      // the file as QEMU would (they stay invalid); allocations still start past the cluster.
      if (refs === 1) {
        this.#fileSize = Math.ceil(size / this.#cs) * this.#cs;
        await this.backend.truncate(this.#fileSize);
        this.#tornSize = undefined;
        grown = { offset, size };
      }
    }
    const walked = await walkQed(
      {
        backend: this.backend,
        geometry: this.#geometry(),
        l1TableOffset: this.#h.l1TableOffset,
        imageSize: this.#h.imageSize,
        l1: this.#l1,
        readL2: async (offset) => (await this.#l2(offset)).bytes,
      },
      repair,
    );
    const r =
      grown === undefined
        ? walked
        : {
            ...walked,
            corruptionsFixed: walked.corruptionsFixed + 1,
            problems: [tornClusterGrown(grown.offset, grown.size), ...walked.problems],
          };
    let markedClean = false;
    if (repair && r.corruptions === 0 && r.checkErrors === 0 && this.needCheck) {
      this.#cancelTimer();
      await this.#clearNeedCheck();
      markedClean = true;
    }
    return { ...r, leaksFixed: 0, imageEndOffset: this.#fileSize, markedClean };
  }

  /**
   * Name a new backing file (or none, `filename` undefined) in the header, as QEMU's
   * bdrv_qed_change_backing_file (see backing.ts for the layout and crash safety). Everything
   * written so far is flushed first. Guest data is not touched: assign `backing` to read
   * through the new backing image.
   */
  async changeBackingFile(change: QedBackingChange): Promise<void> {
    this.#checkWritable();
    planQedBackingChange(this.#h, change); // refusals before anything is written
    await this.flush();
    await this.#serialMeta(async () => {
      const plan = planQedBackingChange(this.#h, change);
      const head = encodeQedHeader(plan.header);
      const name = plan.name;
      if (name !== undefined && name.offset === head.byteLength) {
        const both = new Uint8Array(head.byteLength + name.bytes.byteLength);
        both.set(head, 0);
        both.set(name.bytes, head.byteLength);
        await this.backend.write(0, both);
      } else {
        if (name !== undefined) {
          await this.backend.write(name.offset, name.bytes);
          await this.backend.flush();
        }
        await this.backend.write(0, head);
      }
      await this.backend.flush();
      Object.assign(this.#h, plan.header);
    });
    this.#backingFilename = change.filename;
    this.#backingFormat =
      change.filename !== undefined && change.format === "raw" ? "raw" : undefined;
  }

  /** @internal Replace the autoclear mask and make the header durable (open uses this). */
  async _setAutoclear(mask: bigint): Promise<void> {
    this.#checkWritable();
    this.#h.autoclearFeatures = mask;
    await this.#writeHeader();
    await this.backend.flush();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#cancelTimer();
    try {
      while (this.#plug !== undefined) await this.#plug;
      if (!this.readOnly) {
        await this.backend.flush();
        // Clean shutdown: no check needed on the next open.
        if (this.needCheck) {
          this.#h.features &= ~QED_F_NEED_CHECK;
          await this.#writeHeader();
          await this.backend.flush();
        }
      }
    } finally {
      this.#closed = true;
      try {
        await this.backing?.close();
      } finally {
        await this.backend.close();
      }
    }
  }

  // ---------------------------------------------------------------- guards

  #checkOpen(): void {
    if (this.#closed) throw imageClosedError(this.backend.name);
  }

  #checkWritable(): void {
    this.#checkOpen();
    if (this.readOnly) throw imageReadOnlyError(this.backend.name);
  }
}

/** Read and validate the header, backing file name and L1 table of a QED file. */
export async function readQedMetadata(backend: BlockBackend): Promise<{
  header: QedHeader;
  /** QEMU's `file_size` (see {@link qedFileSize}). */
  fileSize: number;
  /** The real size of the file in bytes. */
  size: number;
  backingFilename: string | undefined;
  l1: Uint8Array;
}> {
  const size = await backend.size();
  const head = new Uint8Array(Math.min(size, QED_HEADER_SIZE));
  if (head.length > 0) await backend.read(0, head);
  const header = decodeQedHeader(head);
  validateQedHeader(header, size);
  const fileSize = qedFileSize(size, header.clusterSize);
  let backingFilename: string | undefined;
  if ((header.features & QED_F_BACKING_FILE) !== 0n) {
    const raw = new Uint8Array(header.backingFilenameSize);
    await backend.read(header.backingFilenameOffset, raw, { zeroPastEof: true });
    try {
      backingFilename = new TextDecoder("utf-8", { fatal: true }).decode(raw);
    } catch (e) {
      throw new FormatError(
        `QED backing file name at ${hex(header.backingFilenameOffset)} is not valid UTF-8`,
        {
          offset: header.backingFilenameOffset,
          cause: e,
        },
      );
    }
  }
  const l1 = new Uint8Array(header.tableSize * header.clusterSize);
  await backend.read(header.l1TableOffset, l1, { zeroPastEof: true });
  return { header, fileSize, size, backingFilename, l1 };
}

/**
 * Open a QED image, read-only unless `options.readOnly` is false (as every format driver).
 * Read-write opens clear unknown autoclear bits and, when the need-check bit is set, check and
 * repair the image first (as QEMU does); a read-write open of a read-only backend is refused.
 *
 * The backing file, if any, is opened through `options.openBacking`. Without it, `noBacking`
 * opens the image as if it had no backing file; with neither, a read-only open goes on without
 * it (reads that reach it fail) and a read-write open is refused.
 */
export async function openQed(
  backend: BlockBackend,
  options: QedOpenOptions = {},
): Promise<QedImage> {
  const readOnly = options.readOnly !== false;
  if (!readOnly && backend.readOnly) {
    throw imageReadOnlyError(backend.name, "cannot open read/write: the file is read-only");
  }
  const { header, fileSize, size, backingFilename, l1 } = await readQedMetadata(backend);
  const noBacking = options.noBacking === true;
  if (
    !readOnly &&
    backingFilename !== undefined &&
    !noBacking &&
    options.openBacking === undefined
  ) {
    throw noBackingOpenerError(backingFilename);
  }
  const image = new QedImage(
    backend,
    header,
    l1,
    fileSize,
    backingFilename,
    readOnly,
    options,
    size,
  );
  if (!readOnly) {
    if ((header.autoclearFeatures & ~QED_KNOWN_AUTOCLEAR_FEATURES) !== 0n) {
      await image._setAutoclear(header.autoclearFeatures & QED_KNOWN_AUTOCLEAR_FEATURES);
    }
    if ((header.features & QED_F_NEED_CHECK) !== 0n) {
      await image.check({ repair: true });
    }
  }
  if (backingFilename !== undefined && options.openBacking !== undefined && !noBacking) {
    const depth = (options.depth ?? 0) + 1;
    image.backing = await options.openBacking({
      filename: backingFilename,
      format: image.info().backingFormat,
      relativeTo: backend.name,
      readOnly: true,
      depth,
      chain: [...(options.chain ?? []), backend.name],
    });
  }
  return image;
}
