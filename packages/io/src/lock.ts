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
 * One difference, on purpose: qemu-img refuses to *read* an image while a QEMU process writes
 * it (unless given -U); qimg reads it, and refuses a read only when QEMU denies reading (a
 * consistent-read lock). Inside the process, a read of a file open for writing is refused.
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

const LINE =
  /^\d+:\s+(->\s+)?(OFDLCK|POSIX)\s+\S+\s+(READ|WRITE)\s+(-?\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s+(\d+)\s+(\d+|EOF)\s*$/;

/**
 * Which of QEMU's lock bytes other processes hold on the file with device `dev` and inode
 * `ino`, from the text of /proc/locks. Locks that only wait (`->`) and POSIX locks of this
 * process are not counted; OFD locks are never this process's (Node cannot take them).
 */
export function parseProcLocks(text: string, dev: bigint, ino: bigint, pid: number): ForeignLocks {
  const [major, minor] = majorMinor(dev);
  let held = 0;
  let unshared = 0;
  for (const line of text.split("\n")) {
    const m = LINE.exec(line);
    if (m === null || m[1] !== undefined) continue;
    if (m[2] === "POSIX" && Number(m[4]) === pid) continue;
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
  return parseProcLocks(text, dev, ino, process.pid);
}

/** One open's claim on an image file; release it when the file is closed. */
export interface ImageLock {
  release(): void;
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

/**
 * Claim the file `fd` (opened from `path`) for `mode`, or throw {@link ImageLockedError}
 * when an open of this process or a QEMU process (seen through its lock bytes) excludes it.
 */
export function lockImageFile(fd: number, path: string, mode: LockMode): ImageLock {
  const st = fs.fstatSync(fd, { bigint: true });
  const key = `${st.dev}:${st.ino}`;
  const want = MODES[mode];
  const mine = registry.get(key) ?? [];
  let held = 0;
  let unshared = 0;
  for (const h of mine) {
    held |= h.held;
    unshared |= ALL & ~h.shared;
  }
  check(path, want, { held, unshared }, "this process", true);
  // Another process: a reader is refused only when reading is denied (qemu-img would also
  // refuse it while QEMU writes, unless given -U; qimg reads such an image, see the README).
  check(path, want, foreignLocks(st.dev, st.ino), "another process", mode === "write");
  const entry: Holder = { held: want.held, shared: want.shared };
  mine.push(entry);
  registry.set(key, mine);
  let released = false;
  return {
    release(): void {
      if (released) return;
      released = true;
      const list = registry.get(key);
      if (list === undefined) return;
      const i = list.indexOf(entry);
      if (i >= 0) list.splice(i, 1);
      if (list.length === 0) registry.delete(key);
    },
  };
}
