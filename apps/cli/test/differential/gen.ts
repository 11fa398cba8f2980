/**
 * The seeded generator of the differential suite: from one seed, a create-option set, a virtual
 * size (often not a multiple of 512 or of the cluster), an optional backing file of another size
 * and format with random content, a sequence of operations (qemu-io's writes at any offset and
 * length, write-zeroes with and without unmap, discard, compressed writes, flush; resize; on
 * qcow2 internal snapshots created, applied and deleted, persistent bitmaps added, removed,
 * cleared, enabled, disabled and merged) and a list of conversions. The runner (run.ts) replays it on twin images through QEMU and qimg.
 */
import { seededRandom } from "@qimg/io";

export type ImageFormat = "qcow2" | "qed";
export type AnyFormat = ImageFormat | "raw";

export type Op =
  | { readonly k: "write"; readonly off: number; readonly len: number; readonly pat: number }
  | { readonly k: "zero"; readonly off: number; readonly len: number; readonly unmap: boolean }
  | { readonly k: "discard"; readonly off: number; readonly len: number }
  | { readonly k: "wc"; readonly off: number; readonly len: number; readonly pat: number }
  | { readonly k: "flush" }
  /** Concurrent requests (aio_write, aio_write -z) on disjoint ranges, then aio_flush. */
  | { readonly k: "aio"; readonly parts: readonly AioPart[] }
  | { readonly k: "resize"; readonly delta: number }
  /**
   * Internal snapshot action (qcow2): `qemu-img snapshot -c/-a/-d NAME` on QEMU's twin, `qimg
   * snapshot` on qimg's. Create: later writes must copy shared clusters; apply: the guest bytes
   * and disk size go back to the snapshot's; delete: the first snapshot of that name goes.
   */
  | { readonly k: "snapshot"; readonly act: SnapshotAct; readonly name: string }
  /**
   * Persistent-bitmap action (qcow2 v3): `qemu-img bitmap --ACT` on QEMU's twin, `qimg bitmap`
   * on qimg's. `granularity` (add) is `-g`, default when undefined; `source` (merge) is the
   * bitmap merged into `name`.
   */
  | {
      readonly k: "bitmap";
      readonly act: BitmapAct;
      readonly name: string;
      readonly granularity?: number | undefined;
      readonly source?: string | undefined;
    };

export type SnapshotAct = "create" | "apply" | "delete";
export type BitmapAct = "add" | "remove" | "clear" | "enable" | "disable" | "merge";

export interface AioPart {
  readonly off: number;
  readonly len: number;
  /** Fill byte; 0 with `zero` means aio_write -z. */
  readonly pat: number;
  readonly zero: boolean;
}

export interface Backing {
  readonly format: AnyFormat;
  readonly size: number;
  /** Ranges of random bytes (the rest reads zeros and stays unallocated). */
  readonly extents: readonly { readonly off: number; readonly len: number }[];
  readonly seed: number;
}

export interface Convert {
  readonly format: AnyFormat;
  readonly compress: boolean;
  /** Target creation options (`-o`), without backing_file. */
  readonly options: readonly string[];
  /** Keep the source's backing file as the target's (`-o backing_file=...,backing_fmt=...`). */
  readonly keepBacking: boolean;
}

export interface CaseSpec {
  readonly seed: number;
  readonly format: ImageFormat;
  /** `-o` creation options other than data_file and backing_file/backing_fmt. */
  readonly options: readonly string[];
  /** qcow2 only: an external data file (the runner names it). */
  readonly dataFile: boolean;
  readonly backing: Backing | undefined;
  /** Virtual size given to create; undefined = the backing file's. */
  readonly size: number | undefined;
  readonly ops: readonly Op[];
  readonly converts: readonly Convert[];
  /** Persistent dirty bitmaps added with `qemu-img bitmap --add` to both twins (qcow2 v3). */
  readonly bitmaps: readonly { readonly name: string; readonly granularity: number }[];
  /** The last run of operations ends with qemu-io's `abort` (a crash: no flush, no close). */
  readonly crash?: boolean;
}

export interface GenLimits {
  /** Largest virtual size drawn (bytes). */
  readonly maxSize: number;
  readonly minOps: number;
  readonly maxOps: number;
  /** Conversions per case; all kinds when undefined. */
  readonly converts: number | undefined;
}

export const CI_LIMITS: GenLimits = { maxSize: 3 << 20, minOps: 3, maxOps: 12, converts: 1 };
export const LONG_LIMITS: GenLimits = {
  maxSize: 6 << 20,
  minOps: 3,
  maxOps: 16,
  converts: undefined,
};

/** qemu-img rounds a qcow2/QED virtual size up to whole 512-byte sectors. */
export const roundSector = (n: number): number => Math.ceil(n / 512) * 512;

class Draw {
  readonly rnd: () => number;
  constructor(seed: number) {
    this.rnd = seededRandom(seed);
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.rnd() * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.rnd() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.rnd() * xs.length)] as T;
  }
  /** A power of two 2^k, k in [lo, hi], weighted by `weights` when given. */
  pow2(lo: number, hi: number): number {
    return 2 ** this.int(lo, hi);
  }
}

/** A byte count: often unaligned, sometimes a sector or cluster multiple. */
function drawSize(d: Draw, max: number, cluster: number): number {
  const n = d.int(1, max);
  const r = d.rnd();
  if (r < 0.45) return n;
  if (r < 0.7) return Math.max(512, Math.floor(n / 512) * 512);
  return Math.max(cluster, Math.floor(n / cluster) * cluster);
}

/** A request length for an image of `size` bytes with clusters of `cluster`. */
function drawLength(d: Draw, size: number, cluster: number): number {
  const r = d.rnd();
  let len: number;
  if (r < 0.3) len = d.int(1, 700);
  else if (r < 0.55) len = d.int(1, Math.min(size, 3 * cluster + 1000));
  else if (r < 0.75) len = d.int(1, 4) * cluster;
  else if (r < 0.9) len = d.int(1, 64) * 512;
  else len = d.int(1, size);
  return Math.max(1, Math.min(len, size));
}

function drawOffset(d: Draw, size: number, len: number, cluster: number): number {
  const room = Math.max(0, size - len);
  const r = d.rnd();
  if (r < 0.03) return size - len + d.int(1, 4096); // past the end: must be refused by both
  if (r < 0.35) return Math.floor(d.int(0, room) / cluster) * cluster;
  if (r < 0.5) return Math.floor(d.int(0, room) / 512) * 512;
  if (r < 0.58) return room; // ends exactly at the end of the disk
  return d.int(0, room);
}

const QCOW2_CLUSTERS = [9, 9, 10, 11, 12, 12, 13, 14, 15, 16, 16, 16, 17, 18, 19, 20, 21];

function drawQcow2Options(d: Draw): { options: string[]; dataFile: boolean; cluster: number } {
  // (the option list is filtered by consistent() in most cases)
  const options: string[] = [];
  const v2 = d.chance(0.2);
  if (v2 || d.chance(0.3)) options.push(`compat=${v2 ? "0.10" : "1.1"}`);
  const cluster = 2 ** d.pick(QCOW2_CLUSTERS);
  if (cluster !== 65536 || d.chance(0.3)) options.push(`cluster_size=${cluster}`);
  if (d.chance(0.5)) options.push(`refcount_bits=${d.pow2(0, 6)}`);
  if (d.chance(0.25)) options.push(`extended_l2=${d.chance(0.85) ? "on" : "off"}`);
  if (d.chance(0.2)) options.push(`lazy_refcounts=${d.chance(0.85) ? "on" : "off"}`);
  if (d.chance(0.3)) options.push(`compression_type=${d.chance(0.8) ? "zstd" : "zlib"}`);
  const dataFile = d.chance(0.15);
  if (dataFile && d.chance(0.5)) options.push("data_file_raw=on");
  const r = d.rnd();
  if (r < 0.15) options.push("preallocation=metadata");
  else if (r < 0.22) options.push("preallocation=falloc");
  else if (r < 0.27) options.push("preallocation=full");
  else if (r < 0.32) options.push("preallocation=off");
  return { options, dataFile, cluster };
}

function drawQedOptions(d: Draw): { options: string[]; cluster: number } {
  const options: string[] = [];
  const cluster = 2 ** d.pick([12, 12, 13, 14, 15, 16, 16, 17, 18, 19, 20, 21]);
  if (cluster !== 65536 || d.chance(0.3)) options.push(`cluster_size=${cluster}`);
  if (d.chance(0.3)) options.push(`table_size=${d.chance(0.9) ? d.pow2(0, 4) : d.int(1, 16)}`);
  return { options, cluster };
}

function drawConvertOptions(d: Draw, format: AnyFormat, compress: boolean): string[] {
  const o: string[] = [];
  if (format === "qcow2") {
    if (d.chance(0.5)) o.push(`cluster_size=${2 ** d.pick(QCOW2_CLUSTERS)}`);
    if (d.chance(0.15)) o.push("compat=0.10");
    else if (compress && d.chance(0.4)) o.push("compression_type=zstd");
    if (d.chance(0.2)) o.push(`refcount_bits=${d.pow2(0, 6)}`);
  } else if (format === "qed") {
    if (d.chance(0.5)) o.push(`cluster_size=${2 ** d.int(12, 21)}`);
  }
  return o;
}

/** Drop the options that QEMU refuses together (v2 + v3 features, small extended-L2 clusters...). */
function consistent(
  options: string[],
  cluster: number,
  backing: boolean,
  dataFile: boolean,
): string[] {
  const v2 = options.includes("compat=0.10");
  const has = (prefix: string): boolean => options.some((o) => o.startsWith(prefix));
  const drop = (pred: (o: string) => boolean): void => {
    options = options.filter((o) => !pred(o));
  };
  if (v2) {
    drop((o) =>
      /^(refcount_bits=(?!16$)|lazy_refcounts=on|extended_l2=on|compression_type=zstd|data_file_raw)/.test(
        o,
      ),
    );
  }
  if (cluster < 16384) drop((o) => o === "extended_l2=on");
  if (backing) {
    drop((o) => o === "data_file_raw=on");
    if (
      has("preallocation=") &&
      !options.includes("extended_l2=on") &&
      !options.includes("preallocation=off")
    ) {
      drop((o) => o.startsWith("preallocation="));
    }
  }
  if (v2 && dataFile) options = options.filter((o) => !o.startsWith("compat="));
  return options;
}

/** Every conversion kind, in order; CI cases draw a few of them. */
function allConverts(d: Draw, hasBacking: boolean): Convert[] {
  const out: Convert[] = [
    { format: "raw", compress: false, options: [], keepBacking: false },
    {
      format: "qcow2",
      compress: false,
      options: drawConvertOptions(d, "qcow2", false),
      keepBacking: false,
    },
    {
      format: "qcow2",
      compress: true,
      options: drawConvertOptions(d, "qcow2", true),
      keepBacking: false,
    },
    {
      format: "qed",
      compress: false,
      options: drawConvertOptions(d, "qed", false),
      keepBacking: false,
    },
  ];
  if (hasBacking) {
    out.push({
      format: "qcow2",
      compress: false,
      options: drawConvertOptions(d, "qcow2", false),
      keepBacking: true,
    });
    out.push({ format: "qed", compress: false, options: [], keepBacking: true });
  }
  // Refused by qemu-img ("Compression not supported for this file format"): both must refuse.
  if (d.chance(0.1))
    out.push({
      format: d.pick(["qed", "raw"] as const),
      compress: true,
      options: [],
      keepBacking: false,
    });
  return out;
}

/** A snapshot action; `snaps` (names and disk sizes, in table order) follows it. */
function drawSnapshotOp(
  d: Draw,
  snaps: { name: string; size: number }[],
  index: number,
  cur: number,
): Extract<Op, { k: "snapshot" }> {
  const a = d.rnd();
  if (snaps.length === 0 || a < 0.35) {
    // Now and then a name taken already: QEMU keeps both (apply/delete find the first).
    const name = snaps.length > 0 && d.chance(0.1) ? d.pick(snaps).name : `s${index}`;
    snaps.push({ name, size: cur });
    return { k: "snapshot", act: "create", name };
  }
  // Rarely a name that does not exist: both must refuse.
  const name = d.chance(0.05) ? "nosuch" : d.pick(snaps).name;
  if (a < 0.75) return { k: "snapshot", act: "apply", name };
  const at = snaps.findIndex((x) => x.name === name);
  if (at >= 0) snaps.splice(at, 1);
  return { k: "snapshot", act: "delete", name };
}

/** A bitmap action; `names` (the bitmaps that exist) follows it. */
function drawBitmapOp(d: Draw, names: string[], next: number): Extract<Op, { k: "bitmap" }> {
  const a = d.rnd();
  if (names.length === 0 || a < 0.3) {
    const name = names.length > 0 && d.chance(0.08) ? d.pick(names) : `b${next}`;
    if (!names.includes(name)) names.push(name);
    const granularity = d.chance(0.3) ? undefined : d.pow2(9, 21);
    return { k: "bitmap", act: "add", name, granularity };
  }
  const name = d.chance(0.05) ? "nosuch" : d.pick(names);
  if (a < 0.45) {
    const at = names.indexOf(name);
    if (at >= 0) names.splice(at, 1);
    return { k: "bitmap", act: "remove", name };
  }
  if (a < 0.6) return { k: "bitmap", act: "clear", name };
  if (a < 0.75) return { k: "bitmap", act: "disable", name };
  if (a < 0.87) return { k: "bitmap", act: "enable", name };
  return { k: "bitmap", act: "merge", name, source: d.pick(names) };
}

export function generateCase(seed: number, limits: GenLimits = CI_LIMITS): CaseSpec {
  const d = new Draw(seed);
  const format: ImageFormat = d.chance(0.78) ? "qcow2" : "qed";
  let options: string[];
  let dataFile = false;
  let cluster: number;
  if (format === "qcow2") {
    ({ options, dataFile, cluster } = drawQcow2Options(d));
  } else {
    ({ options, cluster } = drawQedOptions(d));
  }
  let size: number | undefined = drawSize(d, limits.maxSize, cluster);
  const hasBacking = d.chance(0.4);
  // Most cases keep to combinations QEMU accepts; the rest check that qimg refuses them too.
  if (format === "qcow2" && d.chance(0.85)) {
    options = consistent(options, cluster, hasBacking, dataFile);
  }
  let backing: Backing | undefined;
  if (hasBacking) {
    const bsize = drawSize(d, limits.maxSize, 4096);
    const extents: { off: number; len: number }[] = [];
    const n = d.int(1, 6);
    for (let i = 0; i < n; i++) {
      const len = d.int(1, Math.max(1, Math.floor(bsize / 2)));
      extents.push({ off: d.int(0, Math.max(0, bsize - len)), len: Math.min(len, bsize) });
    }
    backing = {
      format: d.pick(["qcow2", "qcow2", "raw", "qed"] as const),
      size: bsize,
      extents,
      seed: d.int(1, 2 ** 31),
    };
    if (d.chance(0.2)) size = undefined;
  }
  const bitmaps: { name: string; granularity: number }[] = [];
  if (format === "qcow2" && !options.includes("compat=0.10") && d.chance(0.15)) {
    const n = d.int(1, 2);
    for (let i = 0; i < n; i++) bitmaps.push({ name: `b${i}`, granularity: d.pow2(9, 21) });
  }
  // Track the size QEMU will have, to aim requests at it.
  let cur = roundSector(size ?? backing?.size ?? 0);
  const v3 = format === "qcow2" && !options.includes("compat=0.10");
  // What the snapshot and bitmap actions drawn so far leave (if QEMU runs them all), to aim
  // later actions mostly at names that exist.
  const snaps: { name: string; size: number }[] = [];
  const marks = bitmaps.map((b) => b.name);
  let nextBitmap = bitmaps.length;
  const ops: Op[] = [];
  const fresh = d.chance(0.5);
  const preallocated = options.some((o) => /^preallocation=(metadata|falloc|full)$/.test(o));
  const touched = new Set<number>();
  const touch = (off: number, len: number): void => {
    for (let c = Math.floor(off / cluster); c * cluster < off + len; c++) touched.add(c);
  };
  // Snapshot and bitmap actions: a few cases get many (sequences of creates, applies and
  // deletes; adds, merges, disables...), most get few or none (each costs a qemu-img run).
  const pSnapshot = format === "qcow2" && !dataFile ? (d.chance(0.25) ? 0.25 : 0.03) : 0;
  const pBitmap = v3 ? (d.chance(0.2) ? 0.2 : 0.02) : 0;
  const nops = d.int(limits.minOps, limits.maxOps);
  for (let i = 0; i < nops; i++) {
    if (d.chance(pSnapshot)) {
      const op = drawSnapshotOp(d, snaps, ops.length, cur);
      if (op.act === "apply") cur = snaps.find((x) => x.name === op.name)?.size ?? cur;
      ops.push(op);
      continue;
    }
    if (d.chance(pBitmap)) {
      const op = drawBitmapOp(d, marks, nextBitmap);
      if (op.act === "add" && op.name === `b${nextBitmap}`) nextBitmap++;
      ops.push(op);
      continue;
    }
    if (d.chance(0.12)) {
      // Disjoint requests in flight together, packed in a window of a few clusters so that they
      // share clusters (concurrent allocation and copy-on-write of one cluster).
      const window = Math.min(cur, d.int(1, 3) * cluster + d.int(0, 4096));
      const start = Math.max(0, Math.min(cur - window, Math.floor(d.int(0, cur) / 512) * 512));
      const cuts = new Set<number>();
      const n = d.int(2, 5);
      while (cuts.size < n * 2) cuts.add(start + d.int(0, window));
      const pts = [...cuts].sort((a, b) => a - b);
      const parts: AioPart[] = [];
      for (let j = 0; j + 1 < pts.length; j += 2) {
        const off = pts[j] as number;
        const len = (pts[j + 1] as number) - off;
        if (len <= 0) continue;
        const zero = d.chance(0.25);
        parts.push({ off, len, pat: zero ? 0 : d.int(1, 255), zero });
        touch(off, len);
      }
      if (parts.length > 0) {
        ops.push({ k: "aio", parts: d.chance(0.5) ? parts.reverse() : parts });
        continue;
      }
    }
    const r = d.rnd();
    if (r < 0.36) {
      const len = drawLength(d, cur, cluster);
      ops.push({ k: "write", off: drawOffset(d, cur, len, cluster), len, pat: d.int(1, 255) });
    } else if (r < 0.52) {
      const len = drawLength(d, cur, cluster);
      ops.push({ k: "zero", off: drawOffset(d, cur, len, cluster), len, unmap: d.chance(0.5) });
    } else if (r < 0.64) {
      const len = drawLength(d, cur, cluster);
      ops.push({ k: "discard", off: drawOffset(d, cur, len, cluster), len });
    } else if (r < 0.8) {
      // Compressed: whole clusters (the last may end at the disk end); sometimes misaligned.
      const clusters = Math.max(1, Math.ceil(cur / cluster));
      let first = d.int(0, clusters - 1);
      if (fresh) {
        // QEMU refuses compressed writes onto clusters that have data (EIO): in half of the
        // cases aim only at clusters no earlier operation touched, so that the twins do not
        // part there and later differences get seen.
        if (preallocated) {
          ops.push({ k: "flush" });
          continue;
        }
        let tries = 0;
        while (touched.has(first) && tries++ < 20) first = d.int(0, clusters - 1);
        if (touched.has(first)) {
          ops.push({ k: "flush" });
          continue;
        }
      }
      const off = first * cluster;
      const n = d.int(1, Math.min(3, clusters - first));
      let len = Math.min(n * cluster, cur - off);
      let o = off;
      if (d.chance(0.07))
        len = d.pick([512, 1000, cluster + 512, cluster - 512].filter((x) => x > 0));
      if (d.chance(0.05)) o = off + 512;
      ops.push({ k: "wc", off: o, len: Math.max(1, len), pat: d.int(1, 255) });
      if (fresh) {
        let end = first + 1;
        while (end < Math.ceil((o + len) / cluster) && !touched.has(end)) end++;
        const last = ops[ops.length - 1];
        if (last?.k === "wc") {
          ops[ops.length - 1] = {
            ...last,
            len: Math.min(last.len, Math.max(1, end * cluster - o)),
          };
        }
      }
    } else if (r < 0.92) {
      ops.push({ k: "flush" });
      continue;
    } else {
      const delta = d.chance(0.75) ? d.int(1, 2048) * 512 : d.int(1, 600_000);
      ops.push({ k: "resize", delta });
      if (delta % 512 === 0) cur += delta;
    }
    const last = ops[ops.length - 1];
    if (last !== undefined && (last.k === "write" || last.k === "zero" || last.k === "wc")) {
      touch(last.off, last.len);
    }
  }
  let converts = allConverts(d, backing !== undefined);
  if (limits.converts !== undefined) {
    const chosen: Convert[] = [];
    for (let i = 0; i < limits.converts && converts.length > 0; i++) {
      const j = d.int(0, converts.length - 1);
      chosen.push(converts[j] as Convert);
      converts = converts.filter((_, x) => x !== j);
    }
    converts = chosen;
  }
  const crash = d.chance(0.1);
  return { seed, format, options, dataFile, backing, size, ops, converts, bitmaps, crash };
}

/** qemu-img snapshot's option of each action. */
export const SNAPSHOT_FLAG: Readonly<Record<SnapshotAct, string>> = {
  create: "-c",
  apply: "-a",
  delete: "-d",
};

/** The options of `qemu-img bitmap` for a bitmap operation (the file and the name follow). */
export function bitmapOptions(op: Extract<Op, { k: "bitmap" }>): string[] {
  const a = op.act === "merge" ? ["--merge", op.source ?? ""] : [`--${op.act}`];
  if (op.act === "add" && op.granularity !== undefined) a.push("-g", String(op.granularity));
  return a;
}

/** The qemu-io command lines of an operation (resize is not one: the runner runs qemu-img). */
export function ioLines(op: Op): string[] {
  if (op.k !== "aio") return [ioCommand(op)];
  return [
    ...op.parts.map((p) =>
      p.zero ? `aio_write -z ${p.off} ${p.len}` : `aio_write -P ${p.pat} ${p.off} ${p.len}`,
    ),
    "aio_flush",
  ];
}

/** An operation as text (one line; an aio group joined with " + "). */
export function ioCommand(op: Op): string {
  switch (op.k) {
    case "aio":
      return ioLines(op).join(" + ");
    case "write":
      return `write -P ${op.pat} ${op.off} ${op.len}`;
    case "zero":
      return `write -z${op.unmap ? " -u" : ""} ${op.off} ${op.len}`;
    case "discard":
      return `discard ${op.off} ${op.len}`;
    case "wc":
      return `write -c -P ${op.pat} ${op.off} ${op.len}`;
    case "flush":
      return "flush";
    case "resize":
      return `(resize +${op.delta})`;
    case "snapshot":
      return `(snapshot ${SNAPSHOT_FLAG[op.act]} ${op.name})`;
    case "bitmap":
      return `(bitmap ${bitmapOptions(op).join(" ")} ${op.name})`;
  }
}

/** Short text of a case for reports. */
export function describeCase(c: CaseSpec): string {
  const b = c.backing;
  return [
    `format=${c.format}`,
    `options=${c.options.join(",") || "(defaults)"}`,
    c.dataFile ? "data_file" : "",
    `size=${c.size ?? "(backing's)"}`,
    b ? `backing=${b.format}:${b.size}` : "",
    c.bitmaps.length > 0
      ? `bitmaps=${c.bitmaps.map((x) => `${x.name}:${x.granularity}`).join(",")}`
      : "",
  ]
    .filter((x) => x !== "")
    .join(" ");
}
