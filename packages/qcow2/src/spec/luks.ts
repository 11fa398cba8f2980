/**
 * The LUKS (version 1) header a LUKS-encrypted qcow2 image keeps where its full-disk-encryption
 * header extension points (big-endian, 592 bytes; 8 key slots of 48 bytes at 208), and the
 * facts `qemu-img info` shows from it without a key (QEMU's qcrypto_block_luks_get_info).
 */
import { FormatError, defineStruct } from "@qimg/structs";

/** "LUKS\xba\xbe". */
export const LUKS_MAGIC = Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe);
/** Key slot `active` value of a slot in use. */
export const LUKS_SLOT_ENABLED = 0x00ac71f3;
/** Key slot `active` value of an unused slot. */
export const LUKS_SLOT_DISABLED = 0x0000dead;
/** Number of key slots. */
export const LUKS_SLOTS = 8;
/** LUKS counts offsets in 512-byte sectors. */
export const LUKS_SECTOR = 512;

/** One key slot: 48 bytes. */
export const LUKS_KEY_SLOT = {
  active: { offset: 0, type: "u32", doc: "u32: 0x00AC71F3 in use, 0x0000DEAD unused" },
  iterations: { offset: 4, type: "u32", unit: "iterations", doc: "u32: PBKDF2 iterations" },
  salt: { offset: 8, type: "bytes", length: 32, doc: "32 bytes: PBKDF2 salt" },
  keyOffset: {
    offset: 40,
    type: "u32",
    unit: "sectors",
    doc: "u32: start of the key material, in 512-byte sectors",
  },
  stripes: { offset: 44, type: "u32", unit: "stripes", doc: "u32: anti-forensic stripes" },
} as const;
/** One LUKS key slot. */
export const LuksKeySlot = defineStruct("LUKS key slot", "big", 48, LUKS_KEY_SLOT);

/** The LUKS header before the key slots: 208 bytes. */
export const LUKS_HEADER = {
  magic: { offset: 0, type: "bytes", length: 6, doc: '6 bytes: "LUKS\\xba\\xbe"' },
  version: { offset: 6, type: "u16", doc: "u16: format version (1)" },
  cipherName: { offset: 8, type: "bytes", length: 32, doc: "32 bytes: cipher name, NUL padded" },
  cipherMode: { offset: 40, type: "bytes", length: 32, doc: "32 bytes: mode-ivgen, NUL padded" },
  hashSpec: { offset: 72, type: "bytes", length: 32, doc: "32 bytes: hash name, NUL padded" },
  payloadOffset: {
    offset: 104,
    type: "u32",
    unit: "sectors",
    doc: "u32: start of the encrypted data, in 512-byte sectors",
  },
  keyBytes: { offset: 108, type: "u32", unit: "bytes", doc: "u32: master key length" },
  mkDigest: { offset: 112, type: "bytes", length: 20, doc: "20 bytes: master key digest" },
  mkDigestSalt: { offset: 132, type: "bytes", length: 32, doc: "32 bytes: digest salt" },
  mkDigestIterations: {
    offset: 164,
    type: "u32",
    unit: "iterations",
    doc: "u32: PBKDF2 iterations of the master key digest",
  },
  uuid: { offset: 168, type: "bytes", length: 40, doc: "40 bytes: UUID text, NUL padded" },
} as const;
/** The fixed part of the LUKS header. */
export const LuksHeaderFields = defineStruct("LUKS header", "big", 208, LUKS_HEADER);

/** Size of the whole header: the fixed part and 8 key slots. */
export const LUKS_HEADER_SIZE = 208 + LUKS_SLOTS * 48;

/** A decoded key slot. */
export interface LuksKeySlotValue {
  /** Raw `active` word ({@link LUKS_SLOT_ENABLED} when in use). */
  readonly active: number;
  /** PBKDF2 iterations. */
  readonly iterations: number;
  /** PBKDF2 salt (32 bytes). */
  readonly salt: Uint8Array;
  /** Key material start in 512-byte sectors. */
  readonly keyOffset: number;
  /** Anti-forensic stripes. */
  readonly stripes: number;
}

/** A decoded LUKS header (strings without their NUL padding). */
export interface LuksHeader {
  /** Format version. */
  readonly version: number;
  /** Cipher name ("aes", "serpent", ...). */
  readonly cipherName: string;
  /** Cipher mode with its IV generator ("xts-plain64", "cbc-essiv:sha256"). */
  readonly cipherMode: string;
  /** Hash of the key derivation ("sha256"). */
  readonly hashSpec: string;
  /** Encrypted data start in 512-byte sectors. */
  readonly payloadOffset: number;
  /** Master key length in bytes. */
  readonly keyBytes: number;
  /** Master key digest (20 bytes). */
  readonly mkDigest: Uint8Array;
  /** Master key digest salt (32 bytes). */
  readonly mkDigestSalt: Uint8Array;
  /** PBKDF2 iterations of the master key digest. */
  readonly mkDigestIterations: number;
  /** UUID text. */
  readonly uuid: string;
  /** The 8 key slots. */
  readonly slots: readonly LuksKeySlotValue[];
}

const dec = new TextDecoder();
const enc = new TextEncoder();

function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return dec.decode(nul < 0 ? b : b.subarray(0, nul));
}

function padded(s: string, n: number): Uint8Array {
  const out = new Uint8Array(n);
  out.set(enc.encode(s).subarray(0, n));
  return out;
}

/** Decode a LUKS header (the first {@link LUKS_HEADER_SIZE} bytes of `bytes`). */
export function decodeLuksHeader(bytes: Uint8Array, fileOffset?: number): LuksHeader {
  if (bytes.byteLength < LUKS_HEADER_SIZE) {
    throw new FormatError(
      `LUKS header needs ${LUKS_HEADER_SIZE} bytes but only ${bytes.byteLength} are available`,
      { offset: fileOffset },
    );
  }
  const h = LuksHeaderFields.decode(bytes, 0, fileOffset);
  if (!h.magic.every((b, i) => b === LUKS_MAGIC[i])) {
    throw new FormatError("Volume is not in LUKS format", { offset: fileOffset });
  }
  const slots: LuksKeySlotValue[] = [];
  for (let i = 0; i < LUKS_SLOTS; i++) slots.push(LuksKeySlot.decode(bytes, 208 + i * 48));
  return {
    version: h.version,
    cipherName: cString(h.cipherName),
    cipherMode: cString(h.cipherMode),
    hashSpec: cString(h.hashSpec),
    payloadOffset: h.payloadOffset,
    keyBytes: h.keyBytes,
    mkDigest: h.mkDigest,
    mkDigestSalt: h.mkDigestSalt,
    mkDigestIterations: h.mkDigestIterations,
    uuid: cString(h.uuid),
    slots,
  };
}

/**
 * Encode a LUKS header into {@link LUKS_HEADER_SIZE} bytes (strings NUL padded). The inverse
 * of {@link decodeLuksHeader} for headers whose string fields carry nothing after their NUL.
 */
export function encodeLuksHeader(h: LuksHeader): Uint8Array {
  const out = new Uint8Array(LUKS_HEADER_SIZE);
  LuksHeaderFields.encode(
    {
      magic: LUKS_MAGIC,
      version: h.version,
      cipherName: padded(h.cipherName, 32),
      cipherMode: padded(h.cipherMode, 32),
      hashSpec: padded(h.hashSpec, 32),
      payloadOffset: h.payloadOffset,
      keyBytes: h.keyBytes,
      mkDigest: h.mkDigest,
      mkDigestSalt: h.mkDigestSalt,
      mkDigestIterations: h.mkDigestIterations,
      uuid: padded(h.uuid, 40),
    },
    out,
  );
  h.slots.forEach((s, i) => LuksKeySlot.encode(s, out, 208 + i * 48));
  return out;
}

/** The LUKS facts `qemu-img info` shows (QAPI QCryptoBlockInfoLUKS). */
export interface LuksInfo {
  /** "aes-256", "serpent-128", ... (the key length halved for XTS). */
  readonly cipherAlg: string;
  /** "xts", "cbc", "ecb", "ctr". */
  readonly cipherMode: string;
  /** "plain", "plain64", "essiv". */
  readonly ivgenAlg: string;
  /** The ESSIV hash, for `essiv` only. */
  readonly ivgenHashAlg: string | undefined;
  /** The key derivation hash. */
  readonly hashAlg: string;
  /** Start of the encrypted data in bytes. */
  readonly payloadOffset: number;
  /** PBKDF2 iterations of the master key digest. */
  readonly masterKeyIters: number;
  /** UUID text. */
  readonly uuid: string;
  /** Per slot: in use, key material offset in bytes, and iterations/stripes when in use. */
  readonly slots: readonly LuksSlotInfo[];
}

/** One key slot as `qemu-img info` shows it. */
export interface LuksSlotInfo {
  /** The slot holds a key. */
  readonly active: boolean;
  /** Start of the slot's key material in bytes. */
  readonly keyOffset: number;
  /** PBKDF2 iterations (active slots only). */
  readonly iters?: number | undefined;
  /** Anti-forensic stripes (active slots only). */
  readonly stripes?: number | undefined;
}

/** The header facts as QEMU reports them (no key needed). */
export function luksInfo(h: LuksHeader): LuksInfo {
  const dash = h.cipherMode.indexOf("-");
  const mode = dash < 0 ? h.cipherMode : h.cipherMode.slice(0, dash);
  const ivgen = dash < 0 ? "plain" : h.cipherMode.slice(dash + 1);
  const colon = ivgen.indexOf(":");
  const ivgenAlg = colon < 0 ? ivgen : ivgen.slice(0, colon);
  const ivgenHash = colon < 0 ? undefined : ivgen.slice(colon + 1);
  const keyBits = ((mode === "xts" ? h.keyBytes / 2 : h.keyBytes) * 8) | 0;
  return {
    cipherAlg: `${h.cipherName}-${keyBits}`,
    cipherMode: mode,
    ivgenAlg,
    ivgenHashAlg: ivgenAlg === "essiv" ? ivgenHash : undefined,
    hashAlg: h.hashSpec,
    payloadOffset: h.payloadOffset * LUKS_SECTOR,
    masterKeyIters: h.mkDigestIterations,
    uuid: h.uuid,
    slots: h.slots.map((s) => {
      const active = s.active === LUKS_SLOT_ENABLED;
      return {
        active,
        keyOffset: s.keyOffset * LUKS_SECTOR,
        ...(active ? { iters: s.iterations, stripes: s.stripes } : {}),
      };
    }),
  };
}
