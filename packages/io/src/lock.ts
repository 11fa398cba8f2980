/**
 * Image locking: one writer per image, as QEMU keeps it (Node only).
 *
 * QEMU describes what an open image does with *permissions* (consistent read, write, write
 * unchanged, resize) and which of them it lets others have (*shared* permissions). Its file
 * driver publishes both as byte-range read locks on the image file: it locks byte
 * `100 + bit` for each permission it holds and byte `200 + bit` for each permission it does not
 * share. Before opening, it checks that nobody holds a lock on `200 + bit` for a permission it
 * wants, and nobody holds `100 + bit` for a permission it will not share. The byte numbers and
 * the bit order are QEMU's (block/file-posix.c, RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE; the
 * bits are BLK_PERM_CONSISTENT_READ, _WRITE, _WRITE_UNCHANGED, _RESIZE).
 *
 * Node has no fcntl(), so qimg can *read* those locks but cannot *take* them: on Linux the
 * kernel lists every lock in /proc/locks with the file's device and inode, which is enough to
 * refuse what QEMU would refuse while a QEMU process has the image open. QEMU cannot see that
 * qimg has an image open. Inside one process, a registry keyed by device and inode applies the
 * same rules between qimg's own opens.
 *
 * As qemu-img, a read-only open is refused while a QEMU process writes the image (it does not
 * share write), unless it is opened with forceShare (qemu-img -U). Inside the process, a read
 * of a file open for writing is refused the same way.
 *
 * What an open asks for (QEMU's defaults for a format node over a file):
 * - read-only: holds consistent read; shares everything except write and resize.
 * - read-write: holds consistent read, write and resize; shares consistent read and write
 *   unchanged.
 * - read-only with `forceShare` (qemu-img -U): holds consistent read and shares everything.
 */
import * as fs from "node:fs";
import { IoError } from "@qimg/structs";

/** QEMU's permission bits, by bit number. */
export const QEMU_PERMISSIONS = ["consistent read", "write", "write unchanged", "resize"] as const;
/** One of QEMU's permission names (see {@link QEMU_PERMISSIONS}). */
export type QemuPermission = (typeof QEMU_PERMISSIONS)[number];

/** First lock byte of the held permissions (QEMU's RAW_LOCK_PERM_BASE). */
export const LOCK_PERM_BASE = 100;
/** First lock byte of the permissions not shared (QEMU's RAW_LOCK_SHARED_BASE). */
export const LOCK_SHARED_BASE = 200;

const CONSISTENT_READ = 1 << 0;
const WRITE = 1 << 1;
const WRITE_UNCHANGED = 1 << 2;
const RESIZE = 1 << 3;
const ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

export type LockMode = "read" | "write" | "read-shared";

/** Held and shared permissions (bit masks) of each mode. */
const MODES: Readonly<Record<LockMode, { readonly held: number; readonly shared: number }>> = {
  read: { held: CONSISTENT_READ, shared: CONSISTENT_READ | WRITE_UNCHANGED },
  write: { held: CONSISTENT_READ | WRITE | RESIZE, shared: CONSISTENT_READ | WRITE_UNCHANGED },
  "read-shared": { held: CONSISTENT_READ, shared: ALL },
};

/** The image is in use in a way that excludes this open. `permission` names the conflict. */
export class ImageLockedError extends IoError {
  /** The permission that could not be had. */
  readonly permission: QemuPermission;
  /** True when another user holds `permission` that this open will not share. */
  readonly shared: boolean;
  /** Where the conflicting user is: another open in this process, or another process. */
  readonly holder: "this process" | "another process";

  constructor(
    path: string,
    permission: QemuPermission,
    shared: boolean,
    holder: "this process" | "another process",
  ) {
    super(
      `${path}: Failed to get ${shared ? "shared " : ""}"${permission}" lock. Is another process using the image [${path}]?`,
    );
    this.permission = permission;
    this.shared = shared;
    this.holder = holder;
  }
}

interface Holder {
  readonly held: number;
  readonly shared: number;
}

/** Open files of this process, by `dev:ino`. */
const registry = new Map<string, Holder[]>();

function firstBit(mask: number): QemuPermission {
  for (let bit = 0; bit < QEMU_PERMISSIONS.length; bit++) {
    if (mask & (1 << bit)) return QEMU_PERMISSIONS[bit]!;
  }
  return QEMU_PERMISSIONS[0];
}

/** Decode glibc's dev_t encoding into Linux's major and minor numbers. */
function majorMinor(dev: bigint): [bigint, bigint] {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return [major, minor];
}

/** Lock bytes held by other processes on the file, as a mask per base (perm, shared). */
export interface ForeignLocks {
  /** Bit i set: byte LOCK_PERM_BASE + i is locked (someone holds permission i). */
  readonly held: number;
  /** Bit i set: byte LOCK_SHARED_BASE + i is locked (someone does not share permission i). */
  readonly unshared: number;
}

const NO_PIDS: ReadonlySet<number> = new Set();

const LINE =
  /^\d+:\s+(->\s+)?(OFDLCK|POSIX)\s+\S+\s+(READ|WRITE)\s+(-?\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s+(\d+)\s+(\d+|EOF)\s*$/;

/**
 * Which of QEMU's lock bytes other processes hold on the file with device `dev` and inode
 * `ino`, from the text of /proc/locks. Locks that only wait (`->`) and POSIX locks of this
 * process are not counted; OFD locks are never this process's (Node cannot take them).
 */
export function parseProcLocks(
  text: string,
  dev: bigint,
  ino: bigint,
  pid: number,
  ownPids: ReadonlySet<number> = NO_PIDS,
): ForeignLocks {
  const [major, minor] = majorMinor(dev);
  let held = 0;
  let unshared = 0;
  for (const line of text.split("\n")) {
    const m = LINE.exec(line);
    if (m === null || m[1] !== undefined) continue;
    if (m[2] === "POSIX" && (Number(m[4]) === pid || ownPids.has(Number(m[4])))) continue;
    if (BigInt("0x" + m[5]!) !== major || BigInt("0x" + m[6]!) !== minor) continue;
    if (BigInt(m[7]!) !== ino) continue;
    const start = Number(m[8]);
    const end = m[9] === "EOF" ? Number.MAX_SAFE_INTEGER : Number(m[9]);
    for (let bit = 0; bit < QEMU_PERMISSIONS.length; bit++) {
      const p = LOCK_PERM_BASE + bit;
      const s = LOCK_SHARED_BASE + bit;
      if (start <= p && p <= end) held |= 1 << bit;
      if (start <= s && s <= end) unshared |= 1 << bit;
    }
  }
  return { held, unshared };
}

/** Where the kernel lists file locks (Linux). Tests may point it elsewhere. */
let procLocksPath = "/proc/locks";

/** For tests: read lock listings from `path` instead of /proc/locks (undefined restores it). */
export function setProcLocksPathForTesting(path: string | undefined): void {
  procLocksPath = path ?? "/proc/locks";
}

function foreignLocks(dev: bigint, ino: bigint): ForeignLocks {
  let text: string;
  try {
    text = fs.readFileSync(procLocksPath, "latin1");
  } catch {
    return { held: 0, unshared: 0 }; // not Linux, or no procfs: nothing to see
  }
  return parseProcLocks(text, dev, ino, process.pid, publisherPids);
}

/** One open's claim on an image file; release it when the file is closed. */
export interface ImageLock {
  /** True when QEMU can see the claim (lock bytes held by a helper process, see below). */
  readonly published: boolean;
  /** Ends the claim; resolves when published locks are gone too. Idempotent. */
  release(): Promise<void>;
}

/**
 * Refuse when `others` deny a permission `want` holds, or (with `exclusive`) hold one it
 * does not share.
 */
function check(
  path: string,
  want: Holder,
  others: { readonly held: number; readonly unshared: number },
  holder: "this process" | "another process",
  exclusive: boolean,
): void {
  const denied = want.held & others.unshared;
  if (denied !== 0) throw new ImageLockedError(path, firstBit(denied), false, holder);
  const taken = exclusive ? ~want.shared & others.held & ALL : 0;
  if (taken !== 0) throw new ImageLockedError(path, firstBit(taken), true, holder);
}

/** QEMU's lock bytes for `want`: its held permissions, then the ones it does not share. */
function lockBytes(want: Holder): number[] {
  const bytes: number[] = [];
  for (let bit = 0; bit < QEMU_PERMISSIONS.length; bit++) {
    if (want.held & (1 << bit)) bytes.push(LOCK_PERM_BASE + bit);
  }
  for (let bit = 0; bit < QEMU_PERMISSIONS.length; bit++) {
    if (!(want.shared & (1 << bit))) bytes.push(LOCK_SHARED_BASE + bit);
  }
  return bytes;
}

/**
 * Publishing locks for QEMU to see. Node cannot call fcntl(), so a small Perl process opens
 * the file and holds a POSIX read lock on each of QEMU's bytes until its standard input
 * closes (when the backend is closed, or this process ends in any way). QEMU tests for
 * conflicts with F_OFD_GETLK, which sees POSIX locks of other processes too. The struct flock
 * layout below is the LP64 Linux one, so this is offered on Linux x64 and arm64 only.
 */
const PUBLISHER = [
  "use strict; use Fcntl;",
  "my ($path, @bytes) = @ARGV; $| = 1;",
  'open(my $fh, "<", $path) or do { print "err $!\\n"; exit 1 };',
  "for my $b (@bytes) {",
  '  my $fl = pack("s s x4 q q l x4", F_RDLCK, 0, $b, 1, 0);',
  '  fcntl($fh, F_SETLK, $fl) or do { print "err $!\\n"; exit 1 };',
  "}",
  "my @st = stat($fh);",
  'print "ok $st[0] $st[1]\\n";',
  "while (<STDIN>) {}",
].join("\n");

const publisherPids = new Set<number>();

/** Whether lock publishing can work here (platform and architecture). */
export function canPublishLocks(): boolean {
  return process.platform === "linux" && (process.arch === "x64" || process.arch === "arm64");
}

interface Publisher {
  readonly pid: number;
  /** Ends the helper; resolves once it has exited (and its locks are gone). */
  stop(): Promise<void>;
}

/** Start a publisher for `bytes` of `path`; undefined when it cannot run or hold them. */
async function publish(
  path: string,
  bytes: readonly number[],
  dev: bigint,
  ino: bigint,
): Promise<Publisher | undefined> {
  if (!canPublishLocks()) return undefined;
  // Loaded here: most opens never publish, and child_process costs start-up time.
  const { spawn } = await import("node:child_process");
  return new Promise((resolve) => {
    let child: import("node:child_process").ChildProcess;
    try {
      child = spawn("perl", ["-e", PUBLISHER, "--", path, ...bytes.map(String)], {
        stdio: ["pipe", "pipe", "ignore"],
      });
    } catch {
      resolve(undefined);
      return;
    }
    let out = "";
    let done = false;
    const finish = (p: Publisher | undefined): void => {
      if (done) return;
      done = true;
      resolve(p);
    };
    const exited = new Promise<void>((r) => child.once("exit", () => r()));
    const stop = (): Promise<void> => {
      // Keep this process alive until the helper is gone (it was unref'd while holding).
      child.ref();
      child.stdin?.end();
      if (child.exitCode === null && child.signalCode === null) child.kill();
      return exited;
    };
    child.on("error", () => finish(undefined));
    child.on("exit", () => {
      // Its locks are gone only now: until then they are still this process's own.
      if (child.pid !== undefined) publisherPids.delete(child.pid);
      finish(undefined);
    });
    child.stdout?.setEncoding("latin1");
    child.stdout?.on("data", (chunk: string) => {
      out += chunk;
      const nl = out.indexOf("\n");
      if (nl < 0) return;
      const [word, d, i] = out.slice(0, nl).split(" ");
      // The helper must have locked the very file this backend has open.
      if (word === "ok" && d === String(dev) && i === String(ino) && child.pid !== undefined) {
        publisherPids.add(child.pid);
        // Neither the helper nor its pipes keep this process alive.
        child.unref();
        (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
        (child.stdout as unknown as { unref?: () => void } | null)?.unref?.();
        finish({ pid: child.pid, stop });
      } else {
        void stop();
        finish(undefined);
      }
    });
  });
}

/** Options of {@link lockImageFile}. */
export interface LockOptions {
  /**
   * Also hold QEMU's lock bytes where QEMU can see them (through a helper process), so a
   * QEMU process started meanwhile refuses the image as it would refuse another QEMU's.
   * Best effort: without Perl, or elsewhere than Linux x64/arm64, only the checks apply
   * (`published` tells).
   */
  readonly publish?: boolean;
}

/**
 * Claim the file `fd` (opened from `path`) for `mode`, or throw {@link ImageLockedError}
 * when an open of this process or a QEMU process (seen through its lock bytes) excludes it.
 */
export async function lockImageFile(
  fd: number,
  path: string,
  mode: LockMode,
  options: LockOptions = {},
): Promise<ImageLock> {
  const st = fs.fstatSync(fd, { bigint: true });
  // A file system without inode numbers (some network and Windows file systems report 0)
  // cannot tell files apart: no claim then, rather than one shared by every file.
  if (st.ino === 0n) return { published: false, release: () => Promise.resolve() };
  const key = `${st.dev}:${st.ino}`;
  const want = MODES[mode];
  const foreign = (): void =>
    // Another process: as qemu-img, a reader is refused while QEMU writes (it does not share
    // write) unless it shares everything (forceShare, qemu-img -U).
    check(path, want, foreignLocks(st.dev, st.ino), "another process", mode !== "read-shared");
  const list = registry.get(key) ?? [];
  let held = 0;
  let unshared = 0;
  for (const h of list) {
    held |= h.held;
    unshared |= ALL & ~h.shared;
  }
  check(path, want, { held, unshared }, "this process", true);
  foreign();
  // Registered before any wait, so a concurrent open in this process sees this one.
  const entry: Holder = { held: want.held, shared: want.shared };
  list.push(entry);
  registry.set(key, list);
  const unregister = (): void => {
    const current = registry.get(key);
    if (current === undefined) return;
    const i = current.indexOf(entry);
    if (i >= 0) current.splice(i, 1);
    if (current.length === 0) registry.delete(key);
  };
  let publisher: Publisher | undefined;
  if (options.publish === true) {
    try {
      publisher = await publish(path, lockBytes(want), st.dev, st.ino);
      // As QEMU does: take the locks, then look again for a user that came in meanwhile.
      foreign();
    } catch (e) {
      await publisher?.stop();
      unregister();
      throw e;
    }
  }
  let released: Promise<void> | undefined;
  return {
    published: publisher !== undefined,
    release(): Promise<void> {
      released ??= (async () => {
        unregister();
        await publisher?.stop();
      })();
      return released;
    },
  };
}
