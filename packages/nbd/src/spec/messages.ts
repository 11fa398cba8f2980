/**
 * The fixed-size NBD messages, each declared once as an offset table with `@qimg/structs`'
 * `defineStruct` (big-endian, as every NBD field). Variable parts (names, data, descriptor
 * lists) follow these headers on the wire and are built by the helpers in `payloads.ts`.
 */
import { defineStruct } from "@qimg/structs";

/** What a newstyle server sends first: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes). */
export const ServerGreeting = defineStruct("NBD server greeting", "big", 18, {
  initMagic: { offset: 0, type: "bits64", doc: "NBD_INIT_MAGIC, 'NBDMAGIC'" },
  optsMagic: { offset: 8, type: "bits64", doc: "NBD_OPTS_MAGIC, 'IHAVEOPT' (newstyle)" },
  handshakeFlags: { offset: 16, type: "u16", doc: "HandshakeFlag bits" },
} as const);

/** The client's answer to the greeting: its flags (4 bytes). */
export const ClientFlags = defineStruct("NBD client flags", "big", 4, {
  flags: { offset: 0, type: "u32", doc: "ClientFlag bits; unknown bits end the session" },
} as const);

/** The header of an option request (16 bytes); `length` bytes of option data follow. */
export const OptionHeader = defineStruct("NBD option header", "big", 16, {
  magic: { offset: 0, type: "bits64", doc: "NBD_OPTS_MAGIC" },
  option: { offset: 8, type: "u32", doc: "NbdOpt code" },
  length: { offset: 12, type: "u32", unit: "bytes", doc: "length of the option data" },
} as const);

/** The header of an option reply (20 bytes); `length` bytes of reply data follow. */
export const OptionReplyHeader = defineStruct("NBD option reply header", "big", 20, {
  magic: { offset: 0, type: "bits64", doc: "NBD_REP_MAGIC" },
  option: { offset: 8, type: "u32", doc: "the option this replies to" },
  type: { offset: 12, type: "u32", doc: "NbdRep reply type (bit 31: error)" },
  length: { offset: 16, type: "u32", unit: "bytes", doc: "length of the reply data" },
} as const);

/** The reply to `NBD_OPT_EXPORT_NAME` (10 bytes; 124 zero bytes follow unless NO_ZEROES). */
export const ExportNameReply = defineStruct("NBD export name reply", "big", 10, {
  size: { offset: 0, type: "u64", unit: "bytes", doc: "export size" },
  flags: { offset: 8, type: "u16", doc: "TransmissionFlag bits" },
} as const);

/** `NBD_REP_INFO` data of type `NBD_INFO_EXPORT` (12 bytes). */
export const InfoExport = defineStruct("NBD_INFO_EXPORT", "big", 12, {
  info: { offset: 0, type: "u16", doc: "NbdInfo.EXPORT" },
  size: { offset: 2, type: "u64", unit: "bytes", doc: "export size" },
  flags: { offset: 10, type: "u16", doc: "TransmissionFlag bits" },
} as const);

/** `NBD_REP_INFO` data of type `NBD_INFO_BLOCK_SIZE` (14 bytes). */
export const InfoBlockSize = defineStruct("NBD_INFO_BLOCK_SIZE", "big", 14, {
  info: { offset: 0, type: "u16", doc: "NbdInfo.BLOCK_SIZE" },
  minimum: { offset: 2, type: "u32", unit: "bytes", doc: "minimum block size (power of 2)" },
  preferred: { offset: 6, type: "u32", unit: "bytes", doc: "preferred block size (power of 2)" },
  maximum: { offset: 10, type: "u32", unit: "bytes", doc: "maximum payload size" },
} as const);

/** A transmission request (28 bytes); a write's `length` payload bytes follow. */
export const RequestHeader = defineStruct("NBD request", "big", 28, {
  magic: { offset: 0, type: "u32", doc: "NBD_REQUEST_MAGIC" },
  flags: { offset: 4, type: "u16", doc: "CmdFlag bits" },
  type: { offset: 6, type: "u16", doc: "NbdCmd code" },
  cookie: { offset: 8, type: "bits64", doc: "opaque, echoed in every reply to the request" },
  offset: {
    offset: 16,
    type: "bits64",
    unit: "bytes",
    doc: "export offset (bigint: untrusted, may exceed 2^53)",
  },
  length: { offset: 24, type: "u32", unit: "bytes", doc: "length of the range or payload" },
} as const);

/** A simple reply (16 bytes); a successful simple read's data follows. */
export const SimpleReply = defineStruct("NBD simple reply", "big", 16, {
  magic: { offset: 0, type: "u32", doc: "NBD_SIMPLE_REPLY_MAGIC" },
  error: { offset: 4, type: "u32", doc: "NbdError value, 0 on success" },
  cookie: { offset: 8, type: "bits64", doc: "the request's cookie" },
} as const);

/** The header of a structured reply chunk (20 bytes); `length` payload bytes follow. */
export const StructuredReplyHeader = defineStruct("NBD structured reply chunk", "big", 20, {
  magic: { offset: 0, type: "u32", doc: "NBD_STRUCTURED_REPLY_MAGIC" },
  flags: { offset: 4, type: "u16", doc: "ReplyFlag bits (DONE on the last chunk)" },
  type: { offset: 6, type: "u16", doc: "ReplyType code" },
  cookie: { offset: 8, type: "bits64", doc: "the request's cookie" },
  length: { offset: 16, type: "u32", unit: "bytes", doc: "length of the chunk payload" },
} as const);

/** The payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (12 bytes). */
export const OffsetHole = defineStruct("NBD offset hole chunk", "big", 12, {
  offset: { offset: 0, type: "u64", unit: "bytes", doc: "export offset of the hole" },
  length: { offset: 8, type: "u32", unit: "bytes", doc: "length of the range that reads as zeros" },
} as const);

/** One descriptor of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (8 bytes). */
export const BlockStatusDescriptor = defineStruct("NBD block status descriptor", "big", 8, {
  length: { offset: 0, type: "u32", unit: "bytes", doc: "length of the extent (> 0)" },
  flags: { offset: 4, type: "u32", doc: "context-defined status flags" },
} as const);

/** The fixed start of an error chunk's payload (6 bytes); the message follows. */
export const ErrorChunk = defineStruct("NBD error chunk", "big", 6, {
  error: { offset: 0, type: "u32", doc: "NbdError value (nonzero)" },
  messageLength: { offset: 4, type: "u16", unit: "bytes", doc: "length of the UTF-8 message" },
} as const);
