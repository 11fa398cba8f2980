/**
 * `@qimg/nbd`: the NBD protocol's codecs and a connection handler over any byte stream
 * (platform-neutral). The Node server (`serve`) is `@qimg/nbd/node`.
 */
export {
  AllocationState,
  BASE_ALLOCATION,
  ClientFlag,
  CmdFlag,
  DIRTY_BITMAP_STATE_DIRTY,
  EXPORT_NAME_ZEROES,
  HandshakeFlag,
  NBD_INIT_MAGIC,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_OPTS_MAGIC,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdCmd,
  NbdError,
  NbdInfo,
  NbdOpt,
  NbdRep,
  QEMU_DIRTY_BITMAP_PREFIX,
  ReplyFlag,
  ReplyType,
  TransmissionFlag,
} from "./spec/constants.js";
export {
  BlockStatusDescriptor,
  ClientFlags,
  ErrorChunk,
  ExportNameReply,
  InfoBlockSize,
  InfoExport,
  OffsetHole,
  OptionHeader,
  OptionReplyHeader,
  RequestHeader,
  ServerGreeting,
  SimpleReply,
  StructuredReplyHeader,
} from "./spec/messages.js";
export {
  encodeBlockStatusPayload,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeInfoString,
  encodeLengthPrefixed,
  encodeMetaContext,
  encodeOptionReply,
  encodeSimpleReply,
  parseInfoRequest,
  parseMetaContextRequest,
} from "./spec/payloads.js";
export type { InfoRequest, MetaContextRequest, Parsed, StatusExtent } from "./spec/payloads.js";
export { NbdSession, errnoOf } from "./session.js";
export type {
  ByteChannel,
  DetectZeroes,
  DirtyBitmapSource,
  NbdExport,
  SessionHooks,
} from "./session.js";
