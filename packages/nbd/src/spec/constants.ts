/**
 * The NBD protocol's numbers (magics, option and command codes, flags, errors), as the
 * protocol document `doc/proto.md` of NetworkBlockDevice/nbd names them. Every multi-byte
 * field on the wire is big-endian (network byte order).
 */

/** `NBDMAGIC`: the first 8 bytes a newstyle server sends. */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** `IHAVEOPT`: follows the init magic, and starts every option request of the client. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Starts every option reply of the server. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
/** Starts every transmission request (`NBD_REQUEST_MAGIC`). */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Starts a simple reply (`NBD_SIMPLE_REPLY_MAGIC`). */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Starts a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`). */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (16 bits, server to client). */
export const HandshakeFlag = {
  /** `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle. */
  FIXED_NEWSTYLE: 1 << 0,
  /** `NBD_FLAG_NO_ZEROES`: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`. */
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bits, client to server, after the handshake flags). */
export const ClientFlag = {
  /** `NBD_FLAG_C_FIXED_NEWSTYLE`. */
  FIXED_NEWSTYLE: 1 << 0,
  /** `NBD_FLAG_C_NO_ZEROES`. */
  NO_ZEROES: 1 << 1,
} as const;

/** Transmission flags (16 bits): what the export supports, sent when an export is chosen. */
export const TransmissionFlag = {
  /** `NBD_FLAG_HAS_FLAGS`: always set. */
  HAS_FLAGS: 1 << 0,
  /** `NBD_FLAG_READ_ONLY`: writes fail. */
  READ_ONLY: 1 << 1,
  /** `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` works. */
  SEND_FLUSH: 1 << 2,
  /** `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` works. */
  SEND_FUA: 1 << 3,
  /** `NBD_FLAG_ROTATIONAL`: the export behaves like a spinning disk. */
  ROTATIONAL: 1 << 4,
  /** `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` works. */
  SEND_TRIM: 1 << 5,
  /** `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` work. */
  SEND_WRITE_ZEROES: 1 << 6,
  /** `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` works (structured replies only). */
  SEND_DF: 1 << 7,
  /** `NBD_FLAG_CAN_MULTI_CONN`: flushes are visible across all connections. */
  CAN_MULTI_CONN: 1 << 8,
  /** `NBD_FLAG_SEND_RESIZE` (experimental extension). */
  SEND_RESIZE: 1 << 9,
  /** `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` works. */
  SEND_CACHE: 1 << 10,
  /** `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` works. */
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Option codes of the handshake (`NBD_OPT_*`). */
export const NbdOpt = {
  /** Choose an export and start transmission (no error replies possible). */
  EXPORT_NAME: 1,
  /** End the session. */
  ABORT: 2,
  /** List the exports. */
  LIST: 3,
  /** Withdrawn extension. */
  PEEK_EXPORT: 4,
  /** Upgrade to TLS. */
  STARTTLS: 5,
  /** Describe an export without choosing it. */
  INFO: 6,
  /** Describe and choose an export, then start transmission. */
  GO: 7,
  /** Use structured replies in transmission. */
  STRUCTURED_REPLY: 8,
  /** List metadata contexts. */
  LIST_META_CONTEXT: 9,
  /** Select metadata contexts for `NBD_CMD_BLOCK_STATUS`. */
  SET_META_CONTEXT: 10,
  /** 64-bit headers (experimental extension). */
  EXTENDED_HEADERS: 11,
} as const;

/** Option reply types (`NBD_REP_*`); errors have bit 31 set. */
export const NbdRep = {
  /** The option succeeded (last reply to it). */
  ACK: 1,
  /** One export of an `NBD_OPT_LIST`. */
  SERVER: 2,
  /** One piece of export information (`NBD_OPT_INFO`/`GO`). */
  INFO: 3,
  /** One metadata context. */
  META_CONTEXT: 4,
  /** The option is not supported. */
  ERR_UNSUP: 0x80000001,
  /** Refused by policy. */
  ERR_POLICY: 0x80000002,
  /** The option's data is malformed. */
  ERR_INVALID: 0x80000003,
  /** Not supported on this platform. */
  ERR_PLATFORM: 0x80000004,
  /** TLS is required first. */
  ERR_TLS_REQD: 0x80000005,
  /** No such export. */
  ERR_UNKNOWN: 0x80000006,
  /** The server is shutting down. */
  ERR_SHUTDOWN: 0x80000007,
  /** The client must ask for block size information. */
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  /** The request or reply would be too large. */
  ERR_TOO_BIG: 0x80000009,
  /** Extended headers are required. */
  ERR_EXT_HEADER_REQD: 0x8000000a,
} as const;

/** Information types of `NBD_REP_INFO` (`NBD_INFO_*`). */
export const NbdInfo = {
  /** u64 size, u16 transmission flags. */
  EXPORT: 0,
  /** The export's canonical name. */
  NAME: 1,
  /** A human-readable description. */
  DESCRIPTION: 2,
  /** u32 minimum, preferred and maximum block sizes. */
  BLOCK_SIZE: 3,
} as const;

/** Transmission commands (`NBD_CMD_*`). */
export const NbdCmd = {
  /** Read `length` bytes at `offset`. */
  READ: 0,
  /** Write the `length` payload bytes that follow the request. */
  WRITE: 1,
  /** Soft disconnect (no reply). */
  DISC: 2,
  /** Make every completed write durable. */
  FLUSH: 3,
  /** The range is no longer needed. */
  TRIM: 4,
  /** The client will access the range soon. */
  CACHE: 5,
  /** Make the range read as zeros. */
  WRITE_ZEROES: 6,
  /** Report metadata (allocation, dirty bits) of the range. */
  BLOCK_STATUS: 7,
  /** Resize (experimental extension). */
  RESIZE: 8,
} as const;

/** Command flags (16 bits of a request). */
export const CmdFlag = {
  /** `NBD_CMD_FLAG_FUA`: durable before the reply. */
  FUA: 1 << 0,
  /** `NBD_CMD_FLAG_NO_HOLE`: write zeroes must keep the range allocated. */
  NO_HOLE: 1 << 1,
  /** `NBD_CMD_FLAG_DF`: read reply in one content chunk. */
  DF: 1 << 2,
  /** `NBD_CMD_FLAG_REQ_ONE`: block status with one extent per context. */
  REQ_ONE: 1 << 3,
  /** `NBD_CMD_FLAG_FAST_ZERO`: fail with ENOTSUP unless zeroing is fast. */
  FAST_ZERO: 1 << 4,
  /** `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers). */
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Structured reply flags. */
export const ReplyFlag = {
  /** `NBD_REPLY_FLAG_DONE`: the last chunk of the reply. */
  DONE: 1 << 0,
} as const;

/** Structured reply chunk types (`NBD_REPLY_TYPE_*`). */
export const ReplyType = {
  /** No payload; only as the final chunk. */
  NONE: 0,
  /** u64 offset, then data. */
  OFFSET_DATA: 1,
  /** u64 offset, u32 length of a range that reads as zeros. */
  OFFSET_HOLE: 2,
  /** u32 context id, then (u32 length, u32 flags) descriptors. */
  BLOCK_STATUS: 5,
  /** u32 error, u16 message length, message. */
  ERROR: 0x8001,
  /** u32 error, u16 message length, message, u64 offset. */
  ERROR_OFFSET: 0x8002,
} as const;

/** Error values of replies (Linux errno numbers, as the protocol fixes them). */
export const NbdError = {
  /** Operation not permitted (write to a read-only export). */
  EPERM: 1,
  /** Input/output error. */
  EIO: 5,
  /** Out of memory. */
  ENOMEM: 12,
  /** Invalid argument (bad offset, length or flags; unknown command). */
  EINVAL: 22,
  /** No space left (write past the end). */
  ENOSPC: 28,
  /** Value too large (request over the maximum payload). */
  EOVERFLOW: 75,
  /** Not supported (a fast zero that would not be fast). */
  ENOTSUP: 95,
  /** The server is shutting down. */
  ESHUTDOWN: 108,
} as const;

/** `base:allocation` flags of a block status descriptor. */
export const AllocationState = {
  /** `NBD_STATE_HOLE`: not allocated. */
  HOLE: 1 << 0,
  /** `NBD_STATE_ZERO`: reads as zeros. */
  ZERO: 1 << 1,
} as const;

/** `qemu:dirty-bitmap:NAME` flag of a block status descriptor: the range is dirty. */
export const DIRTY_BITMAP_STATE_DIRTY = 1 << 0;

/** The metadata context of allocation status. */
export const BASE_ALLOCATION = "base:allocation";
/** Prefix of QEMU's dirty-bitmap metadata contexts (`qemu:dirty-bitmap:NAME`). */
export const QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:";

/** The largest payload a request may carry or ask for (32 MiB), as qemu-nbd allows. */
export const NBD_MAX_PAYLOAD = 32 * 1024 * 1024;
/** The longest export name or metadata query accepted (the protocol's string limit). */
export const NBD_MAX_STRING = 4096;
/** The number of zero bytes after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES`. */
export const EXPORT_NAME_ZEROES = 124;
