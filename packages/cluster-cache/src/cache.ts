import { InvalidArgumentError, IoError } from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";

/** One cached metadata table. `bytes` is the live table: views read and write it in place. */
export interface CachedTable {
  /** Host offset of the table in the image file. */
  readonly offset: number;
  /** The table's bytes (exactly `tableSize` long). */
  readonly bytes: Uint8Array;
}

/** A sync owed before the next table write (see ClusterCache.dependOnFlush). */
interface FlushTarget {
  readonly backend: BlockBackend;
  /** The cache's own file: settled by any later sync of the cache or of its dependency. */
  readonly own: boolean;
  /** Settled once this cache's sync number `needOwn`, or the dependency's `needDep`, completed. */
  readonly needOwn: number;
  readonly dep: ClusterCache | undefined;
  readonly needDep: number;
}

interface Entry extends CachedTable {
  pins: number;
  dirty: boolean;
  /** Bumped on every markDirty so a writeback racing with a new change keeps the entry dirty. */
  generation: number;
}

/** Options of a {@link ClusterCache}. */
export interface ClusterCacheOptions {
  /** The file the tables live in. */
  readonly backend: BlockBackend;
  /** Size of every table in bytes (an L2 table or refcount block is one cluster; QED tables may be larger). */
  readonly tableSize: number;
  /** Maximum number of tables kept; more are held only while pinned. */
  readonly capacity: number;
  /** Write every change through at once instead of at flush/eviction. Default false (writeback). */
  readonly writethrough?: boolean;
  /** Name used in messages ("L2", "refcount"). */
  readonly name?: string;
}

/** Counters of a {@link ClusterCache}, for tests and tuning. */
export interface ClusterCacheStats {
  /** Requests served from the cache. */
  hits: number;
  /** Requests that had to read the table from the backend. */
  misses: number;
  /** Tables dropped to make room. */
  evictions: number;
  /** Dirty tables written to the backend. */
  writebacks: number;
}

/**
 * A bounded LRU cache of metadata tables keyed by host offset, with dirty tracking,
 * writeback, pinning and flush ordering between caches.
 *
 * Ordering invariant: a cache that `dependsOn` another (the L2 cache depends on the refcount
 * cache) never writes a dirty table to the file before the other cache has been flushed and
 * the file synced. So a refcount increase always reaches the disk before any L2 entry that
 * uses the cluster, and a crash can leave leaks but never a reference without a refcount.
 *
 * A cache can also depend on a sync of the file ({@link ClusterCache.dependOnFlush}, QEMU's
 * `qcow2_cache_depends_on_flush`): after copy-on-write data was written, the next dirty table
 * this cache writes is preceded by a sync, so an L2 entry never reaches the disk before the
 * data it points to — whether or not the cache also depends on another cache.
 */
export class ClusterCache {
  /** Size of every table in bytes. */
  readonly tableSize: number;
  /** Tables kept at most (more only while pinned). */
  readonly capacity: number;
  /** Name used in messages ("L2", "refcount"). */
  readonly name: string;
  /** Hit, miss, eviction and writeback counts. */
  readonly stats: ClusterCacheStats = { hits: 0, misses: 0, evictions: 0, writebacks: 0 };
  /** Write every change through at once (true) or at flush and eviction (false). */
  writethrough: boolean;

  private readonly backend: BlockBackend;
  private readonly entries = new Map<number, Entry>();
  private readonly loading = new Map<number, Promise<Entry>>();
  private dependency: ClusterCache | undefined;
  /**
   * Syncs owed before the next dirty table is written (see dependOnFlush): another file, or
   * this cache's own (`own`), which a sync of this cache or of its dependency that started
   * after the request also settles.
   */
  private readonly flushTargets: FlushTarget[] = [];
  /** Syncs of the file this cache started, and the number of the newest one completed. */
  private syncsStarted = 0;
  private syncedUpTo = 0;
  /** True when tables were written since the file was last synced by this cache. */
  private unsynced = false;
  /** Serialises flushes so two callers never write the same table concurrently. */
  private flushing: Promise<void> | undefined;

  constructor(options: ClusterCacheOptions) {
    if (!Number.isSafeInteger(options.tableSize) || options.tableSize <= 0) {
      throw new InvalidArgumentError(`table size ${options.tableSize} must be a positive integer`);
    }
    if (!Number.isSafeInteger(options.capacity) || options.capacity < 1) {
      throw new InvalidArgumentError(`cache capacity ${options.capacity} must be at least 1`);
    }
    this.backend = options.backend;
    this.tableSize = options.tableSize;
    this.capacity = options.capacity;
    this.writethrough = options.writethrough ?? false;
    this.name = options.name ?? "metadata";
  }

  /** Tables currently held. */
  get size(): number {
    return this.entries.size;
  }

  /** Number of dirty tables. */
  get dirtyCount(): number {
    let n = 0;
    for (const e of this.entries.values()) if (e.dirty) n++;
    return n;
  }

  /**
   * Make this cache depend on `other`: before any dirty table of this cache is written,
   * `other` is flushed and the file synced. Cycles are refused.
   */
  dependOn(other: ClusterCache): void {
    for (let c: ClusterCache | undefined = other; c; c = c.dependency) {
      if (c === this) throw new InvalidArgumentError(`cache dependency cycle through ${this.name}`);
    }
    this.dependency = other;
  }

  /**
   * Before this cache next writes a dirty table (at flush, writethrough or eviction), sync
   * `backend` (default: the file this cache writes to). One-shot, as QEMU's
   * `qcow2_cache_depends_on_flush`: call it each time data that a table will point to was
   * written without a sync (copy-on-write), before the table is marked dirty. The sync
   * happens once however often this is called in between. For the cache's own file, a sync
   * made since by this cache or by the cache it {@link dependOn}s (which lives in the same
   * file) settles it, so no second sync follows one that already covers the data.
   */
  dependOnFlush(backend?: BlockBackend): void {
    const own = backend === undefined || backend === this.backend;
    if (own) {
      // A sync that starts from now on covers the data (the dependency shares the file).
      const dep = this.dependency;
      this.flushTargets.push({
        backend: this.backend,
        own: true,
        needOwn: this.syncsStarted + 1,
        dep,
        needDep: dep ? dep.syncsStarted + 1 : Number.MAX_SAFE_INTEGER,
      });
    } else if (!this.flushTargets.some((t) => t.backend === backend)) {
      this.flushTargets.push({ backend, own: false, needOwn: 0, needDep: 0, dep: undefined });
    }
  }

  /** True while a {@link dependOnFlush} sync is still owed before the next table write. */
  get dependsOnFlush(): boolean {
    this.dropSettled();
    return this.flushTargets.length > 0;
  }

  /**
   * Synchronous lookup for hot paths: the cached table at `offset`, or undefined. Does not pin;
   * use the bytes before the next await.
   */
  peek(offset: number): CachedTable | undefined {
    const e = this.entries.get(offset);
    if (e) {
      this.stats.hits++;
      this.touch(e);
    }
    return e;
  }

  /** Get and pin the table at `offset`, reading it from the file when not cached. */
  async get(offset: number): Promise<CachedTable> {
    const cached = this.entries.get(offset);
    if (cached) {
      this.stats.hits++;
      this.touch(cached);
      cached.pins++;
      return cached;
    }
    let pending = this.loading.get(offset);
    if (!pending) {
      this.stats.misses++;
      pending = this.load(offset);
      this.loading.set(offset, pending);
    }
    const e = await pending;
    e.pins++;
    return e;
  }

  /**
   * Get and pin a zero-filled table at `offset` without reading the file (for a table that
   * was just allocated). Mark it dirty after filling it.
   */
  async getEmpty(offset: number): Promise<CachedTable> {
    const existing = this.entries.get(offset);
    if (existing) {
      existing.bytes.fill(0);
      existing.pins++;
      this.touch(existing);
      return existing;
    }
    await this.makeRoom();
    const e: Entry = {
      offset,
      bytes: new Uint8Array(this.tableSize),
      pins: 1,
      dirty: false,
      generation: 0,
    };
    this.entries.set(offset, e);
    return e;
  }

  /** Unpin a table obtained with `get`/`getEmpty`. */
  release(table: CachedTable): void {
    const e = this.entries.get(table.offset);
    if (!e || e !== table) return;
    if (e.pins <= 0)
      throw new InvalidArgumentError(
        `${this.name} table at ${table.offset} released more than pinned`,
      );
    e.pins--;
  }

  /** Record that a table was modified; writethrough caches write it (in order) at once. */
  async markDirty(table: CachedTable): Promise<void> {
    const e = this.entries.get(table.offset);
    if (!e || e !== table) {
      throw new InvalidArgumentError(`${this.name} table at ${table.offset} is not in the cache`);
    }
    e.dirty = true;
    e.generation++;
    if (this.writethrough) await this.flush();
  }

  /**
   * Write every dirty table (after flushing the dependency), then sync the file.
   * Tables are written in ascending offset order.
   */
  async flush(): Promise<void> {
    await this.writeDirty();
    await this.sync();
    this.unsynced = false;
  }

  /** Sync this cache's file, counting the syncs (one covers what was written before it began). */
  private async sync(): Promise<void> {
    const n = ++this.syncsStarted;
    await this.backend.flush();
    if (n > this.syncedUpTo) this.syncedUpTo = n;
  }

  /** Forget owed syncs of the own file that a sync started since has settled. */
  private dropSettled(): void {
    for (let i = this.flushTargets.length - 1; i >= 0; i--) {
      const t = this.flushTargets[i]!;
      if (
        t.own &&
        (this.syncedUpTo >= t.needOwn || (t.dep !== undefined && t.dep.syncedUpTo >= t.needDep))
      )
        this.flushTargets.splice(i, 1);
    }
  }

  /** Write dirty tables to the file without syncing it (dependencies are still honoured). */
  async writeDirty(): Promise<void> {
    while (this.flushing) await this.flushing;
    const dirty = [...this.entries.values()]
      .filter((e) => e.dirty)
      .sort((a, b) => a.offset - b.offset);
    if (dirty.length === 0) return;
    const run = (async () => {
      await this.flushDependency();
      for (const e of dirty) {
        // A dependOnFlush made while earlier tables were being written still comes first.
        if (this.flushTargets.length > 0) await this.syncTargets();
        await this.writeBack(e);
      }
    })();
    this.flushing = run;
    try {
      await run;
    } finally {
      this.flushing = undefined;
    }
  }

  /** Drop a table from the cache without writing it (its cluster was freed). */
  discard(offset: number): void {
    const e = this.entries.get(offset);
    if (!e) return;
    if (e.pins > 0) throw new InvalidArgumentError(`${this.name} table at ${offset} is pinned`);
    this.entries.delete(offset);
  }

  /** Drop every clean, unpinned table. */
  clear(): void {
    for (const [k, e] of this.entries) if (!e.dirty && e.pins === 0) this.entries.delete(k);
  }

  private touch(e: Entry): void {
    // Map iteration order is insertion order: re-inserting moves the entry to the MRU end.
    this.entries.delete(e.offset);
    this.entries.set(e.offset, e);
  }

  private async load(offset: number): Promise<Entry> {
    try {
      await this.makeRoom();
      const bytes = new Uint8Array(this.tableSize);
      await this.backend.read(offset, bytes);
      const raced = this.entries.get(offset);
      if (raced) return raced;
      const e: Entry = { offset, bytes, pins: 0, dirty: false, generation: 0 };
      this.entries.set(offset, e);
      return e;
    } finally {
      this.loading.delete(offset);
    }
  }

  /** Evict least recently used unpinned tables until one more fits. */
  private async makeRoom(): Promise<void> {
    while (this.entries.size >= this.capacity) {
      let victim: Entry | undefined;
      for (const e of this.entries.values()) {
        if (e.pins === 0) {
          victim = e;
          break;
        }
      }
      if (!victim) return; // everything pinned: hold more than capacity until released
      if (victim.dirty) {
        await this.flushDependency();
        await this.writeBack(victim);
        if (victim.dirty || victim.pins > 0) continue;
      }
      if (this.entries.get(victim.offset) === victim) {
        this.entries.delete(victim.offset);
        this.stats.evictions++;
      }
    }
  }

  private async flushDependency(): Promise<void> {
    const dep = this.dependency;
    // Dirty dependency tables are written and synced; tables it wrote earlier (evictions)
    // may still sit in the file's volatile cache, so those are synced too.
    if (dep && (dep.dirtyCount > 0 || dep.unsynced)) await dep.flush();
    if (this.flushTargets.length > 0) await this.syncTargets();
  }

  /** Sync every file a dependOnFlush asked for; a target stays owed if its sync fails. */
  private async syncTargets(): Promise<void> {
    this.dropSettled();
    while (this.flushTargets.length > 0) {
      const target = this.flushTargets[0]!;
      if (target.own) {
        await this.sync();
        this.dropSettled();
        // A request made while that sync ran is still owed; the loop syncs again for it.
        continue;
      }
      await target.backend.flush();
      // Only drop it once synced (a concurrent caller may have done it already).
      const i = this.flushTargets.indexOf(target);
      if (i >= 0) this.flushTargets.splice(i, 1);
    }
  }

  private async writeBack(e: Entry): Promise<void> {
    const generation = e.generation;
    try {
      await this.backend.write(e.offset, e.bytes);
    } catch (cause) {
      throw new IoError(`writing ${this.name} table at 0x${e.offset.toString(16)} failed`, {
        offset: e.offset,
        cause,
      });
    }
    this.stats.writebacks++;
    this.unsynced = true;
    if (e.generation === generation) e.dirty = false;
  }
}
