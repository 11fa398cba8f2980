/**
 * A pool of worker threads that compress qcow2 clusters in parallel (one worker per core).
 * `compress` has the shape of the qcow2 driver's `Compressor` open option, so the driver's
 * `writeCompressed` hands the compression work to the pool while the main thread keeps
 * reading and writing. How a cluster is compressed is @qimg/qcow2's `defaultCompress`, which
 * each worker calls: the policy (QEMU's deflate window, zstd level) lives there only.
 *
 * The worker is ./compress-worker.ts: from source (tsx) the .ts file is started with tsx's
 * loader; from the bundle, dist/compress-worker.cjs next to dist/cli.cjs.
 */
import { createRequire } from "node:module";
import { availableParallelism } from "node:os";
import { pathToFileURL } from "node:url";
import type { Worker } from "node:worker_threads";

interface Pending {
  readonly resolve: (data: Uint8Array | undefined) => void;
  readonly reject: (e: Error) => void;
  /** A decompression job: its error text is the decoder's own (the driver words it). */
  readonly inflate: boolean;
}

/** A job for a worker (compress-worker.ts has the same shape). */
export interface Job {
  readonly id: number;
  readonly data: Uint8Array;
  /** qcow2 compression type: 0 zlib (raw deflate), 1 zstd. */
  readonly type: number;
  /** Decompress `data` into this many bytes (a cluster) instead of compressing it. */
  readonly inflate?: number;
}

interface Reply {
  readonly id: number;
  /** The compressed cluster. */
  readonly data?: Uint8Array;
  /** Compression did not make the cluster smaller. */
  readonly none?: true;
  readonly error?: string;
}

/** Start one worker: the bundled .js next to this file, or (from source) the .ts via tsx. */
function startWorker(Worker: typeof import("node:worker_threads").Worker): Worker {
  const here = import.meta.url;
  if (!here.endsWith(".ts")) return new Worker(new URL("./compress-worker.cjs", here));
  // Running from source: register tsx's loader inside the worker, then load the .ts file.
  // (Node 20 does not apply `--import tsx` hooks inside workers; tsx's tsImport does work.)
  const api = pathToFileURL(
    createRequire(here)
      .resolve("tsx/esm/api")
      .replace(/index\.cjs$/, "index.mjs"),
  ).href;
  const file = new URL("./compress-worker.ts", here).href;
  const boot = `import(${JSON.stringify(api)}).then((m) => m.tsImport(${JSON.stringify(file)}, ${JSON.stringify(file)}));`;
  return new Worker(boot, { eval: true });
}

export class CompressPool {
  private readonly workers: Worker[] = [];
  private readonly load: number[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  private closed = false;

  /**
   * Start a pool of `threads` workers (default: one per core). node:worker_threads is loaded
   * here, not at start-up: most runs never compress.
   */
  static async start(
    threads = availableParallelism(),
    options: { unrefIdle?: boolean } = {},
  ): Promise<CompressPool> {
    const { Worker } = await import("node:worker_threads");
    return new CompressPool(threads, Worker, options.unrefIdle === true);
  }

  /**
   * `unrefIdle`: an idle worker does not keep the process alive (a pool that lives as long as
   * the process and is never closed); a worker with jobs does, until they are answered.
   */
  private constructor(
    threads: number,
    Worker: typeof import("node:worker_threads").Worker,
    private readonly unrefIdle: boolean,
  ) {
    for (let i = 0; i < Math.max(1, threads); i++) {
      const w = startWorker(Worker);
      if (unrefIdle) w.unref();
      const index = i;
      w.on("message", (reply: Reply) => {
        this.load[index] = (this.load[index] ?? 1) - 1;
        if (this.unrefIdle && this.load[index] === 0) w.unref();
        const p = this.pending.get(reply.id);
        if (p === undefined) return;
        this.pending.delete(reply.id);
        if (reply.data !== undefined) p.resolve(reply.data);
        else if (reply.none === true) p.resolve(undefined);
        else if (p.inflate) p.reject(new Error(reply.error ?? "unknown error"));
        else p.reject(new Error(`compression failed: ${reply.error ?? "unknown error"}`));
      });
      w.on("error", (e) => this.failAll(e));
      this.workers.push(w);
      this.load.push(0);
    }
  }

  get size(): number {
    return this.workers.length;
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  /**
   * A qcow2 `Compressor`: compress one cluster (compression type 0 zlib, 1 zstd) on the least
   * busy worker; resolves to undefined when compression does not make it smaller.
   */
  readonly compress = (
    data: Uint8Array,
    compressionType: number,
  ): Promise<Uint8Array | undefined> => {
    if (this.closed) return Promise.reject(new Error("compression pool is closed"));
    if (compressionType !== 0 && compressionType !== 1) {
      return Promise.reject(new Error(`unknown qcow2 compression type ${compressionType}`));
    }
    const copy = new Uint8Array(data);
    return this.post({ id: 0, data: copy, type: compressionType }, copy, false);
  };

  /**
   * Decompress one compressed cluster (compression type 0 zlib, 1 zstd) on the least busy
   * worker, with @qimg/qcow2's decompressor, into `out` (exactly `out.length` bytes).
   */
  readonly decompress = async (
    src: Uint8Array,
    out: Uint8Array,
    compressionType: number,
  ): Promise<void> => {
    if (this.closed) throw new Error("compression pool is closed");
    const copy = new Uint8Array(src);
    const data = await this.post(
      { id: 0, data: copy, type: compressionType, inflate: out.length },
      copy,
      true,
    );
    if (data?.length !== out.length) {
      throw new Error(`decompressed to ${data?.length ?? 0} bytes instead of ${out.length}`);
    }
    out.set(data);
  };

  /** Send a job (its bytes transferred) to the least busy worker. */
  private post(job: Job, bytes: Uint8Array, inflate: boolean): Promise<Uint8Array | undefined> {
    let best = 0;
    for (let i = 1; i < this.workers.length; i++) {
      if ((this.load[i] ?? 0) < (this.load[best] ?? 0)) best = i;
    }
    const id = this.nextId++;
    return new Promise<Uint8Array | undefined>((resolve, reject) => {
      this.pending.set(id, { resolve, reject, inflate });
      this.load[best] = (this.load[best] ?? 0) + 1;
      if (this.unrefIdle && this.load[best] === 1) this.workers[best]?.ref();
      this.workers[best]?.postMessage({ ...job, id }, [bytes.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.failAll(new Error("compression pool closed"));
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
