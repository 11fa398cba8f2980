/**
 * The variable-length parts of NBD messages: option data parsers (`NBD_OPT_GO`/`INFO`,
 * `NBD_OPT_*_META_CONTEXT`) and builders of whole option replies and reply chunks on top of
 * the fixed headers in `messages.ts`. Parsers never throw on client bytes: they return a
 * problem string instead, which the server answers with `NBD_REP_ERR_INVALID`.
 */
import { viewOf } from "@qimg/structs";
import {
  NBD_MAX_STRING,
  NBD_REP_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "./constants.js";
import {
  BlockStatusDescriptor,
  ErrorChunk,
  OptionReplyHeader,
  SimpleReply,
  StructuredReplyHeader,
} from "./messages.js";

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

/** Decode a protocol string; undefined when it is not valid UTF-8. */
function decodeString(bytes: Uint8Array): string | undefined {
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    return undefined;
  }
}

/** A parsed `NBD_OPT_INFO` / `NBD_OPT_GO` request. */
export interface InfoRequest {
  /** The export name ("" = the default export). */
  readonly name: string;
  /** The `NbdInfo` items the client asks for. */
  readonly infos: readonly number[];
}

/** A parsed `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` request. */
export interface MetaContextRequest {
  /** The export the contexts are for. */
  readonly exportName: string;
  /** The queries (context names or namespace wildcards such as `base:`). */
  readonly queries: readonly string[];
}

/** Either a parsed value or the reason the option data is malformed. */
export type Parsed<T> =
  { readonly ok: true; readonly value: T } | { readonly ok: false; readonly problem: string };

/** Read a u32-length-prefixed string at `at`; returns it and the next position. */
function lengthPrefixed(
  data: Uint8Array,
  at: number,
  what: string,
): { ok: true; text: string; next: number } | { ok: false; problem: string } {
  if (at + 4 > data.length)
    return { ok: false, problem: `${what}: length field past the option data` };
  const len = viewOf(data).getUint32(at, false);
  if (len > NBD_MAX_STRING)
    return { ok: false, problem: `${what}: ${len} bytes is longer than ${NBD_MAX_STRING}` };
  if (at + 4 + len > data.length)
    return { ok: false, problem: `${what}: ${len} bytes run past the option data` };
  const text = decodeString(data.subarray(at + 4, at + 4 + len));
  if (text === undefined) return { ok: false, problem: `${what} is not valid UTF-8` };
  return { ok: true, text, next: at + 4 + len };
}

/** Parse the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: name, then a list of u16 info requests. */
export function parseInfoRequest(data: Uint8Array): Parsed<InfoRequest> {
  const name = lengthPrefixed(data, 0, "export name");
  if (!name.ok) return name;
  const view = viewOf(data);
  if (name.next + 2 > data.length)
    return { ok: false, problem: "information request count past the option data" };
  const count = view.getUint16(name.next, false);
  if (name.next + 2 + 2 * count !== data.length) {
    return {
      ok: false,
      problem: `${count} information requests do not match the option length ${data.length}`,
    };
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(view.getUint16(name.next + 2 + 2 * i, false));
  return { ok: true, value: { name: name.text, infos } };
}

/** Parse the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`. */
export function parseMetaContextRequest(data: Uint8Array): Parsed<MetaContextRequest> {
  const name = lengthPrefixed(data, 0, "export name");
  if (!name.ok) return name;
  if (name.next + 4 > data.length)
    return { ok: false, problem: "query count past the option data" };
  const count = viewOf(data).getUint32(name.next, false);
  const queries: string[] = [];
  let at = name.next + 4;
  for (let i = 0; i < count; i++) {
    const q = lengthPrefixed(data, at, `query ${i}`);
    if (!q.ok) return q;
    queries.push(q.text);
    at = q.next;
  }
  if (at !== data.length)
    return { ok: false, problem: `${data.length - at} bytes after the last query` };
  return { ok: true, value: { exportName: name.text, queries } };
}

/** A whole option reply: header and `data`. */
export function encodeOptionReply(
  option: number,
  type: number,
  data: Uint8Array = new Uint8Array(0),
): Uint8Array {
  const out = new Uint8Array(OptionReplyHeader.size + data.length);
  OptionReplyHeader.encode({ magic: NBD_REP_MAGIC, option, type, length: data.length }, out);
  out.set(data, OptionReplyHeader.size);
  return out;
}

/** A big-endian u16 or u32 (`width` 2 or 4) holding `head`, then `body` and `tail`. */
function headed(
  width: 2 | 4,
  head: number,
  body: Uint8Array,
  tail: Uint8Array = new Uint8Array(0),
): Uint8Array {
  const out = new Uint8Array(width + body.length + tail.length);
  if (width === 2) viewOf(out).setUint16(0, head, false);
  else viewOf(out).setUint32(0, head, false);
  out.set(body, width);
  out.set(tail, width + body.length);
  return out;
}

/** A u32 length followed by the UTF-8 bytes of `text` (and `tail`, not counted, if given). */
export function encodeLengthPrefixed(text: string, tail = ""): Uint8Array {
  const a = utf8.encode(text);
  return headed(4, a.length, a, utf8.encode(tail));
}

/** The data of an `NBD_REP_META_CONTEXT` reply: u32 context id, then the name. */
export function encodeMetaContext(id: number, name: string): Uint8Array {
  return headed(4, id, utf8.encode(name));
}

/** An `NBD_REP_INFO` item carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`). */
export function encodeInfoString(info: number, text: string): Uint8Array {
  return headed(2, info, utf8.encode(text));
}

/** A simple reply header. */
export function encodeSimpleReply(cookie: bigint, error: number): Uint8Array {
  return SimpleReply.encode({ magic: NBD_SIMPLE_REPLY_MAGIC, error, cookie });
}

/** A structured reply chunk header announcing `length` payload bytes. */
export function encodeChunkHeader(
  cookie: bigint,
  flags: number,
  type: number,
  length: number,
): Uint8Array {
  return StructuredReplyHeader.encode({
    magic: NBD_STRUCTURED_REPLY_MAGIC,
    flags,
    type,
    cookie,
    length,
  });
}

/** The payload of an `NBD_REPLY_TYPE_ERROR` chunk. */
export function encodeErrorPayload(error: number, message: string): Uint8Array {
  let m = utf8.encode(message);
  if (m.length > 4096) m = m.subarray(0, 4096);
  const out = new Uint8Array(ErrorChunk.size + m.length);
  ErrorChunk.encode({ error, messageLength: m.length }, out);
  out.set(m, ErrorChunk.size);
  return out;
}

/** One block status extent: its length and context-defined flags. */
export interface StatusExtent {
  /** Length in bytes (> 0, < 2^32). */
  readonly length: number;
  /** Flags defined by the metadata context. */
  readonly flags: number;
}

/** The payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id and descriptors. */
export function encodeBlockStatusPayload(
  contextId: number,
  extents: readonly StatusExtent[],
): Uint8Array {
  const out = new Uint8Array(4 + extents.length * BlockStatusDescriptor.size);
  viewOf(out).setUint32(0, contextId, false);
  extents.forEach((e, i) =>
    BlockStatusDescriptor.encode(e, out, 4 + i * BlockStatusDescriptor.size),
  );
  return out;
}
