/**
 * One NBD connection, from the greeting to the last reply, over any byte stream (a
 * {@link ByteChannel}): fixed newstyle handshake with option haggling, then transmission with
 * many requests in flight. Platform-neutral: `@qimg/nbd/node` supplies sockets.
 *
 * Everything the client sends is untrusted: every length and offset is checked before use,
 * protocol violations that make the byte stream unreadable end the connection (a hard
 * disconnect, as the protocol allows), and every other bad request gets an error reply.
 */
import type { BlockStatus, WritableDiskImage } from "@qimg/io";
import { alignedBuffer } from "@qimg/io";
import { ErrorCode, isQimgError } from "@qimg/structs";
import {
  AllocationState,
  BASE_ALLOCATION,
  ClientFlag,
  CmdFlag,
  DIRTY_BITMAP_STATE_DIRTY,
  EXPORT_NAME_ZEROES,
  HandshakeFlag,
  NBD_INIT_MAGIC,
  NBD_MAX_PAYLOAD,
  NBD_OPTS_MAGIC,
  NBD_REQUEST_MAGIC,
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
import {
  ClientFlags,
  ExportNameReply,
  InfoBlockSize,
  InfoExport,
  OffsetHole,
  OptionHeader,
  RequestHeader,
  ServerGreeting,
} from "./spec/messages.js";
import {
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
  type StatusExtent,
} from "./spec/payloads.js";

/**
 * A bidirectional byte stream the session runs over (a socket). Reads resolve with exactly
 * the bytes asked for, or `null` once the peer has gone (or the channel was closed).
 */
export interface ByteChannel {
  /** Exactly `n` bytes, or null at end of stream. */
  read(n: number): Promise<Uint8Array | null>;
  /** Drop the next `n` bytes without keeping them; false at end of stream. */
  skip(n: number): Promise<boolean>;
  /** Queue `parts` to be sent back to back, in order, before anything written later. */
  write(...parts: Uint8Array[]): void;
  /**
   * Like {@link ByteChannel.write}, then call `done` once the bytes have been handed on (or
   * the stream failed), so their buffers may be reused.
   */
  send(parts: readonly Uint8Array[], done: () => void): void;
  /** Resolves when the queued output is small enough to queue more. */
  drained(): Promise<void>;
  /** Stop reading: pending and later reads resolve with null; output still flows. */
  abortRead(): void;
  /** Close the stream (after sending what is queued). */
  close(): void;
}

/**
 * The dirty ranges of one persistent bitmap, exported as the metadata context
 * `qemu:dirty-bitmap:NAME` (as qemu-nbd's `-B NAME` does).
 */
export interface DirtyBitmapSource {
  /** The bitmap's name (the context is `qemu:dirty-bitmap:` + name). */
  readonly name: string;
  /**
   * Whether the range starting at `offset` is dirty, and for how long it stays so (at most
   * `length` bytes, > 0).
   */
  status(
    offset: number,
    length: number,
  ): Promise<{ readonly length: number; readonly dirty: boolean }>;
}

/** How an export handles writes of zeros (qemu's `detect-zeroes`). */
export type DetectZeroes = "off" | "on" | "unmap";

/** One export: an image and how it is offered. */
export interface NbdExport {
  /** The name clients ask for ("" = the default export). */
  readonly name: string;
  /** A description for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`. */
  readonly description?: string | undefined;
  /** The image. */
  readonly image: WritableDiskImage;
  /** Refuse writes (also when the image itself is read-only). */
  readonly readOnly: boolean;
  /** Advertise `NBD_FLAG_CAN_MULTI_CONN`. */
  readonly multiConn: boolean;
  /** Pass `NBD_CMD_TRIM` and unmapping zero writes on to the image (qemu's `discard=unmap`). */
  readonly discard: boolean;
  /** Turn writes of all-zero data into zero writes. */
  readonly detectZeroes: DetectZeroes;
  /** Flush after every write (qemu's writethrough cache modes). */
  readonly writethrough: boolean;
  /** Persistent bitmaps offered as `qemu:dirty-bitmap:NAME` contexts. */
  readonly bitmaps: readonly DirtyBitmapSource[];
}

/** What a session reports to its server. */
export interface SessionHooks {
  /** A request failed in the image (answered with an error reply); for logging. */
  readonly onError?: ((error: unknown) => void) | undefined;
  /** Called when a write-type request starts and ends (for a clean shutdown). */
  readonly trackWrite?: ((p: Promise<unknown>) => void) | undefined;
  /** How long the handshake may take before the connection is dropped (ms; 0 = no limit). */
  readonly handshakeTimeoutMs?: number | undefined;
}

/** Requests one connection may have in flight before the server stops reading more. */
const MAX_IN_FLIGHT = 64;
/** The largest option data accepted; longer options end the connection. */
const MAX_OPTION_LENGTH = 64 * 1024;
/** The most descriptors one block status chunk carries. */
const MAX_DESCRIPTORS = 1024;

const EMPTY = new Uint8Array(0);

/** Bytes of the `base:allocation` flags for an extent status. */
function allocationFlags(s: BlockStatus): number {
  return (s.data ? 0 : AllocationState.HOLE) | (s.zero ? AllocationState.ZERO : 0);
}

/** The NBD error value for an error thrown by the image. */
export function errnoOf(error: unknown): number {
  if (isQimgError(error)) {
    if (error.code === ErrorCode.READ_ONLY) return NbdError.EPERM;
    if (error.code === ErrorCode.INVALID_ARGUMENT) return NbdError.EINVAL;
  }
  for (let e: unknown = error, depth = 0; e != null && depth < 8; depth++) {
    const code = (e as { code?: unknown }).code;
    if (code === "ENOSPC" || code === "EDQUOT") return NbdError.ENOSPC;
    if (code === "ENOMEM") return NbdError.ENOMEM;
    e = (e as { cause?: unknown }).cause;
  }
  return NbdError.EIO;
}

/** A decoded request header. */
interface Request {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: bigint;
  readonly length: number;
}

/** A selected metadata context. */
interface MetaContext {
  readonly id: number;
  readonly name: string;
  readonly bitmap: DirtyBitmapSource | undefined;
}

/** Thrown inside the handshake to end the connection. */
class HardDisconnect extends Error {}

/**
 * One connection. `run()` resolves when it is over (the client left, sent `NBD_CMD_DISC` or
 * `NBD_OPT_ABORT`, broke the protocol, or {@link NbdSession.stop} was called), after every
 * request it had started has been answered.
 */
export class NbdSession {
  private structured = false;
  private noZeroes = false;
  private contexts: MetaContext[] = [];
  private contextsFor: string | undefined;
  private stopping = false;
  private readonly inFlight = new Set<Promise<void>>();
  private transmission = false;
  private readonly pool = new BufferPool(POOL_LIMIT);

  constructor(
    private readonly channel: ByteChannel,
    private readonly exports: readonly NbdExport[],
    private readonly hooks: SessionHooks = {},
  ) {}

  /** True once the client has chosen an export and transmission started. */
  get inTransmission(): boolean {
    return this.transmission;
  }

  /**
   * Stop reading requests: the requests already started finish and are answered, then the
   * connection closes (a server shutdown).
   */
  stop(): void {
    this.stopping = true;
    this.channel.abortRead();
  }

  /** Serve the connection until it ends. Never rejects. */
  async run(): Promise<void> {
    try {
      const exp = await this.withHandshakeTimeout(this.handshake());
      if (exp === undefined) return;
      this.transmission = true;
      await this.transmit(exp);
    } catch (e) {
      if (!(e instanceof HardDisconnect)) this.hooks.onError?.(e);
    } finally {
      await Promise.allSettled([...this.inFlight]);
      this.channel.close();
    }
  }

  private async withHandshakeTimeout<T>(p: Promise<T>): Promise<T> {
    const ms = this.hooks.handshakeTimeoutMs ?? 0;
    if (ms <= 0) return p;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.channel.close();
        reject(new HardDisconnect("handshake timed out"));
      }, ms);
    });
    try {
      return await Promise.race([p, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  private async need(n: number): Promise<Uint8Array> {
    const b = await this.channel.read(n);
    if (b === null) throw new HardDisconnect("client went away");
    return b;
  }

  private findExport(name: string): NbdExport | undefined {
    return this.exports.find((e) => e.name === name);
  }

  /** Transmission flags of an export as this connection sees it. */
  private transmissionFlags(exp: NbdExport): number {
    const ro = exp.readOnly || exp.image.readOnly;
    // FLUSH and FUA are offered on read-only exports too, as qemu-nbd does (both are no-ops there).
    let f =
      TransmissionFlag.HAS_FLAGS |
      TransmissionFlag.SEND_FLUSH |
      TransmissionFlag.SEND_FUA |
      TransmissionFlag.SEND_CACHE;
    if (ro) f |= TransmissionFlag.READ_ONLY;
    else {
      f |=
        TransmissionFlag.SEND_TRIM |
        TransmissionFlag.SEND_WRITE_ZEROES |
        TransmissionFlag.SEND_FAST_ZERO;
    }
    if (this.structured) f |= TransmissionFlag.SEND_DF;
    if (exp.multiConn) f |= TransmissionFlag.CAN_MULTI_CONN;
    return f;
  }

  // ---------------------------------------------------------------------------------------
  // Handshake

  /** Run the handshake; resolves with the chosen export, or undefined when the session ends. */
  private async handshake(): Promise<NbdExport | undefined> {
    this.channel.write(
      ServerGreeting.encode({
        initMagic: NBD_INIT_MAGIC,
        optsMagic: NBD_OPTS_MAGIC,
        handshakeFlags: HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
      }),
    );
    const { flags } = ClientFlags.decode(await this.need(ClientFlags.size));
    if ((flags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) !== 0) {
      throw new HardDisconnect(`unknown client flags 0x${flags.toString(16)}`);
    }
    this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
    const fixed = (flags & ClientFlag.FIXED_NEWSTYLE) !== 0;
    for (;;) {
      const h = OptionHeader.decode(await this.need(OptionHeader.size));
      if (h.magic !== NBD_OPTS_MAGIC) throw new HardDisconnect("bad option magic");
      if (h.length > MAX_OPTION_LENGTH) {
        throw new HardDisconnect(`option ${h.option} with ${h.length} bytes of data`);
      }
      const data = h.length === 0 ? EMPTY : await this.need(h.length);
      if (!fixed && h.option !== NbdOpt.EXPORT_NAME) {
        // Plain newstyle knows no other option and no error replies.
        throw new HardDisconnect("option haggling without fixed newstyle");
      }
      const reply = (type: number, body?: Uint8Array): void =>
        this.channel.write(encodeOptionReply(h.option, type, body));
      const error = (type: number, message: string): void =>
        reply(type, new TextEncoder().encode(message));
      /** The export named `name`, or undefined once the option is answered ERR_UNKNOWN. */
      const knownExport = (name: string): NbdExport | undefined => {
        const exp = this.findExport(name);
        if (exp === undefined) error(NbdRep.ERR_UNKNOWN, `export '${name}' not present`);
        return exp;
      };
      if (this.stopping && h.option !== NbdOpt.ABORT) {
        error(NbdRep.ERR_SHUTDOWN, "Server shutting down");
        continue;
      }
      switch (h.option) {
        case NbdOpt.EXPORT_NAME: {
          const name = new TextDecoder().decode(data);
          const exp = this.findExport(name);
          if (exp === undefined) throw new HardDisconnect(`unknown export '${name}'`);
          this.channel.write(
            ExportNameReply.encode({
              size: exp.image.virtualSize,
              flags: this.transmissionFlags(exp),
            }),
            this.noZeroes ? EMPTY : new Uint8Array(EXPORT_NAME_ZEROES),
          );
          this.useContextsFor(name);
          return exp;
        }
        case NbdOpt.ABORT:
          reply(NbdRep.ACK);
          return undefined;
        case NbdOpt.LIST:
          if (data.length !== 0) {
            error(NbdRep.ERR_INVALID, "NBD_OPT_LIST takes no data");
            break;
          }
          for (const e of this.exports) {
            reply(NbdRep.SERVER, encodeLengthPrefixed(e.name, e.description ?? ""));
          }
          reply(NbdRep.ACK);
          break;
        case NbdOpt.STRUCTURED_REPLY:
          if (data.length !== 0)
            error(NbdRep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
          else if (this.structured)
            error(NbdRep.ERR_INVALID, "structured replies already negotiated");
          else {
            this.structured = true;
            reply(NbdRep.ACK);
          }
          break;
        case NbdOpt.INFO:
        case NbdOpt.GO: {
          const req = parseInfoRequest(data);
          if (!req.ok) {
            error(NbdRep.ERR_INVALID, req.problem);
            break;
          }
          const exp = knownExport(req.value.name);
          if (exp === undefined) break;
          reply(
            NbdRep.INFO,
            InfoExport.encode({
              info: NbdInfo.EXPORT,
              size: exp.image.virtualSize,
              flags: this.transmissionFlags(exp),
            }),
          );
          if (req.value.infos.includes(NbdInfo.NAME))
            reply(NbdRep.INFO, encodeInfoString(NbdInfo.NAME, exp.name));
          if (req.value.infos.includes(NbdInfo.DESCRIPTION) && exp.description !== undefined) {
            reply(NbdRep.INFO, encodeInfoString(NbdInfo.DESCRIPTION, exp.description));
          }
          reply(
            NbdRep.INFO,
            InfoBlockSize.encode({
              info: NbdInfo.BLOCK_SIZE,
              minimum: 1,
              preferred: 4096,
              maximum: NBD_MAX_PAYLOAD,
            }),
          );
          reply(NbdRep.ACK);
          if (h.option === NbdOpt.GO) {
            this.useContextsFor(req.value.name);
            return exp;
          }
          break;
        }
        case NbdOpt.LIST_META_CONTEXT:
        case NbdOpt.SET_META_CONTEXT: {
          const set = h.option === NbdOpt.SET_META_CONTEXT;
          if (set) {
            this.contexts = [];
            this.contextsFor = undefined;
          }
          if (!this.structured) {
            error(NbdRep.ERR_INVALID, "structured replies are not negotiated");
            break;
          }
          const req = parseMetaContextRequest(data);
          if (!req.ok) {
            error(NbdRep.ERR_INVALID, req.problem);
            break;
          }
          const exp = knownExport(req.value.exportName);
          if (exp === undefined) break;
          const found = this.matchContexts(exp, req.value.queries, set);
          for (const c of found)
            reply(NbdRep.META_CONTEXT, encodeMetaContext(set ? c.id : 0, c.name));
          if (set) {
            this.contexts = found;
            this.contextsFor = exp.name;
          }
          reply(NbdRep.ACK);
          break;
        }
        case NbdOpt.STARTTLS:
          error(NbdRep.ERR_UNSUP, "TLS is not supported");
          break;
        default:
          error(NbdRep.ERR_UNSUP, `option ${h.option} is not supported`);
      }
    }
  }

  /** Contexts stay selected only when the export chosen is the one they were selected for. */
  private useContextsFor(name: string): void {
    if (this.contextsFor !== name) this.contexts = [];
  }

  /** Contexts matching `queries` (all of them for an empty list, when listing). */
  private matchContexts(exp: NbdExport, queries: readonly string[], set: boolean): MetaContext[] {
    const all: MetaContext[] = [
      { id: 1, name: BASE_ALLOCATION, bitmap: undefined },
      ...exp.bitmaps.map((b, i) => ({
        id: 2 + i,
        name: QEMU_DIRTY_BITMAP_PREFIX + b.name,
        bitmap: b,
      })),
    ];
    if (!set && queries.length === 0) return all;
    const out: MetaContext[] = [];
    for (const c of all) {
      const hit = queries.some((q) => {
        if (q === c.name) return true;
        if (set) return false;
        // Listing: a namespace alone (`base:`, `qemu:`) or QEMU's `qemu:dirty-bitmap:` is a wildcard.
        return (
          (q === "base:" || q === "qemu:" || q === QEMU_DIRTY_BITMAP_PREFIX) && c.name.startsWith(q)
        );
      });
      if (hit) out.push(c);
    }
    return out;
  }

  // ---------------------------------------------------------------------------------------
  // Transmission

  private async transmit(exp: NbdExport): Promise<void> {
    for (;;) {
      while (this.inFlight.size >= MAX_IN_FLIGHT) await Promise.race([...this.inFlight]);
      await this.channel.drained();
      if (this.stopping) return;
      const bytes = await this.channel.read(RequestHeader.size);
      if (bytes === null) return;
      const h = RequestHeader.decode(bytes);
      if (h.magic !== NBD_REQUEST_MAGIC) throw new HardDisconnect("bad request magic");
      const req: Request = {
        flags: h.flags,
        type: h.type,
        cookie: h.cookie,
        offset: h.offset,
        length: h.length,
      };
      if (req.type === NbdCmd.DISC) return;
      let payload: Uint8Array | undefined;
      if (req.type === NbdCmd.WRITE) {
        if (req.length > NBD_MAX_PAYLOAD) {
          // Keep the stream in step: drop the payload, then refuse.
          if (!(await this.channel.skip(req.length))) return;
          this.replyError(
            req,
            NbdError.EINVAL,
            `write of ${req.length} bytes is larger than ${NBD_MAX_PAYLOAD}`,
          );
          continue;
        }
        const p = req.length === 0 ? EMPTY : await this.channel.read(req.length);
        if (p === null) return; // gone mid-request: nothing of it was written
        payload = p;
      }
      const task = this.handle(exp, req, payload).catch((e: unknown) => {
        this.hooks.onError?.(e);
      });
      this.inFlight.add(task);
      void task.finally(() => this.inFlight.delete(task));
      if (
        req.type === NbdCmd.WRITE ||
        req.type === NbdCmd.WRITE_ZEROES ||
        req.type === NbdCmd.TRIM ||
        req.type === NbdCmd.FLUSH
      ) {
        this.hooks.trackWrite?.(task);
      }
    }
  }

  /** Check the request; resolves with an error to answer, or undefined when it may run. */
  private validate(exp: NbdExport, req: Request): { errno: number; message: string } | undefined {
    const ro = exp.readOnly || exp.image.readOnly;
    let allowed = 0;
    switch (req.type) {
      case NbdCmd.READ:
        allowed = this.structured ? CmdFlag.DF : 0;
        break;
      case NbdCmd.WRITE:
      case NbdCmd.TRIM:
        allowed = CmdFlag.FUA;
        break;
      case NbdCmd.WRITE_ZEROES:
        allowed = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO;
        break;
      case NbdCmd.BLOCK_STATUS:
        allowed = CmdFlag.REQ_ONE;
        break;
      case NbdCmd.FLUSH:
      case NbdCmd.CACHE:
        break;
      default:
        return { errno: NbdError.EINVAL, message: `unsupported command ${req.type}` };
    }
    if ((req.flags & ~allowed) !== 0) {
      return {
        errno: NbdError.EINVAL,
        message: `unsupported flags 0x${req.flags.toString(16)} for command ${req.type}`,
      };
    }
    if (req.type === NbdCmd.FLUSH) return undefined;
    const writing =
      req.type === NbdCmd.WRITE || req.type === NbdCmd.WRITE_ZEROES || req.type === NbdCmd.TRIM;
    if (writing && ro) return { errno: NbdError.EPERM, message: "export is read-only" };
    if ((req.type === NbdCmd.READ || req.type === NbdCmd.CACHE) && req.length > NBD_MAX_PAYLOAD) {
      return {
        errno: NbdError.EINVAL,
        message: `request of ${req.length} bytes is larger than ${NBD_MAX_PAYLOAD}`,
      };
    }
    const size = BigInt(exp.image.virtualSize);
    if (req.offset > size || BigInt(req.length) > size - req.offset) {
      const errno =
        req.type === NbdCmd.WRITE || req.type === NbdCmd.WRITE_ZEROES
          ? NbdError.ENOSPC
          : NbdError.EINVAL;
      return { errno, message: "operation past the end of the export" };
    }
    if (req.type === NbdCmd.BLOCK_STATUS) {
      if (req.length === 0)
        return { errno: NbdError.EINVAL, message: "block status of zero bytes" };
      if (this.contexts.length === 0)
        return { errno: NbdError.EINVAL, message: "no metadata context selected" };
    }
    return undefined;
  }

  private async handle(
    exp: NbdExport,
    req: Request,
    payload: Uint8Array | undefined,
  ): Promise<void> {
    const bad = this.validate(exp, req);
    if (bad !== undefined) {
      this.replyError(req, bad.errno, bad.message);
      return;
    }
    const image = exp.image;
    const offset = Number(req.offset);
    const length = req.length;
    try {
      switch (req.type) {
        case NbdCmd.READ:
          await this.read(exp, req, offset, length);
          return;
        case NbdCmd.WRITE: {
          const data = payload ?? EMPTY;
          if (data.length > 0) {
            if (exp.detectZeroes !== "off" && isZero(data)) {
              await image.writeZeroes(offset, data.length, {
                mayUnmap: exp.detectZeroes === "unmap" && exp.discard,
              });
            } else {
              await image.write(offset, data);
            }
          }
          await this.afterWrite(exp, req);
          break;
        }
        case NbdCmd.WRITE_ZEROES: {
          if ((req.flags & CmdFlag.FAST_ZERO) !== 0 && !fastZeroes(image)) {
            this.replyError(req, NbdError.ENOTSUP, "fast zeroing is not supported by this format");
            return;
          }
          if (length > 0) {
            await image.writeZeroes(offset, length, {
              mayUnmap: exp.discard && (req.flags & CmdFlag.NO_HOLE) === 0,
            });
          }
          await this.afterWrite(exp, req);
          break;
        }
        case NbdCmd.TRIM:
          if (exp.discard && length > 0) await image.discard(offset, length);
          await this.afterWrite(exp, req);
          break;
        case NbdCmd.FLUSH:
          if (!exp.readOnly && !image.readOnly) await image.flush();
          break;
        case NbdCmd.CACHE:
          if (length > 0) await image.read(offset, new Uint8Array(length));
          break;
        case NbdCmd.BLOCK_STATUS:
          await this.blockStatus(exp, req, offset, length);
          return;
      }
      this.replyOk(req);
    } catch (e) {
      this.hooks.onError?.(e);
      this.replyError(req, errnoOf(e), e instanceof Error ? e.message : String(e));
    }
  }

  private async afterWrite(exp: NbdExport, req: Request): Promise<void> {
    if ((req.flags & CmdFlag.FUA) !== 0 || exp.writethrough) await exp.image.flush();
  }

  private replyOk(req: Request): void {
    if (this.structured) {
      this.channel.write(encodeChunkHeader(req.cookie, ReplyFlag.DONE, ReplyType.NONE, 0));
    } else {
      this.channel.write(encodeSimpleReply(req.cookie, 0));
    }
  }

  private replyError(req: Request, errno: number, message: string): void {
    if (this.structured) {
      const body = encodeErrorPayload(errno, message);
      this.channel.write(
        encodeChunkHeader(req.cookie, ReplyFlag.DONE, ReplyType.ERROR, body.length),
        body,
      );
    } else {
      this.channel.write(encodeSimpleReply(req.cookie, errno));
    }
  }

  /**
   * A read. With structured replies, ranges that read as zeros go out as hole chunks (unless
   * the client asked for one unfragmented chunk); every byte is read before the first chunk
   * is sent, so a failure is one clean error reply.
   */
  private async read(exp: NbdExport, req: Request, offset: number, length: number): Promise<void> {
    const image = exp.image;
    if (!this.structured) {
      const { buf, release } = this.pool.get(length);
      try {
        if (length > 0) await image.read(offset, buf);
      } catch (e) {
        release();
        throw e;
      }
      this.channel.send([encodeSimpleReply(req.cookie, 0), buf], release);
      return;
    }
    if (length === 0) {
      this.replyOk(req);
      return;
    }
    const { buf, release } = this.pool.get(length);
    try {
      await image.read(offset, buf);
    } catch (e) {
      release();
      throw e;
    }
    if ((req.flags & CmdFlag.DF) !== 0) {
      this.sendData(req, offset, buf, true, release);
      return;
    }
    // One read of the whole range (the driver resolves its extents at once), then runs of
    // zero blocks go out as holes: unallocated and zero clusters read as zeros, so this finds
    // them without a block status call per request (which costs a data scan on raw files).
    const parts = zeroRuns(buf, offset);
    // The buffer is free again once the last data chunk has gone out.
    let lastData = -1;
    parts.forEach((p, i) => {
      if (!p.zero) lastData = i;
    });
    if (lastData < 0) release();
    parts.forEach((p, i) => {
      const done = i === parts.length - 1;
      if (!p.zero) {
        const sub = buf.subarray(p.start, p.end);
        this.sendData(req, offset + p.start, sub, done, i === lastData ? release : undefined);
      } else {
        const body = OffsetHole.encode({ offset: offset + p.start, length: p.end - p.start });
        this.channel.write(
          encodeChunkHeader(
            req.cookie,
            done ? ReplyFlag.DONE : 0,
            ReplyType.OFFSET_HOLE,
            body.length,
          ),
          body,
        );
      }
    });
  }

  private sendData(
    req: Request,
    offset: number,
    data: Uint8Array,
    done: boolean,
    release?: () => void,
  ): void {
    const off = new Uint8Array(8);
    const v = new DataView(off.buffer);
    v.setUint32(0, Math.floor(offset / 2 ** 32), false);
    v.setUint32(4, offset >>> 0, false);
    this.channel.send(
      [
        encodeChunkHeader(
          req.cookie,
          done ? ReplyFlag.DONE : 0,
          ReplyType.OFFSET_DATA,
          8 + data.length,
        ),
        off,
        data,
      ],
      release ?? noop,
    );
  }

  /** One block status chunk per selected context. */
  private async blockStatus(
    exp: NbdExport,
    req: Request,
    offset: number,
    length: number,
  ): Promise<void> {
    const one = (req.flags & CmdFlag.REQ_ONE) !== 0;
    const chunks: Uint8Array[] = [];
    for (const c of this.contexts) {
      const extents: { length: number; flags: number }[] = [];
      const end = offset + length;
      for (let at = offset; at < end && extents.length < MAX_DESCRIPTORS;) {
        // Descriptor lengths are 32 bits: ask for at most 4 GiB - 512 at a time.
        const ask = Math.min(end - at, 0xffff_fe00);
        let n: number;
        let flags: number;
        if (c.bitmap === undefined) {
          const s = await exp.image.blockStatus(at, ask);
          n = s.length;
          flags = allocationFlags(s);
        } else {
          const s = await c.bitmap.status(at, ask);
          n = s.length;
          flags = s.dirty ? DIRTY_BITMAP_STATE_DIRTY : 0;
        }
        n = Math.max(1, Math.min(n, ask));
        const last = extents[extents.length - 1];
        if (last !== undefined && last.flags === flags && last.length + n <= 0xffff_fe00)
          last.length += n;
        else {
          if (one && last !== undefined) break;
          extents.push({ length: n, flags });
        }
        at += n;
      }
      chunks.push(encodeBlockStatusPayload(c.id, extents as StatusExtent[]));
    }
    chunks.forEach((body, i) => {
      const done = i === chunks.length - 1;
      this.channel.write(
        encodeChunkHeader(
          req.cookie,
          done ? ReplyFlag.DONE : 0,
          ReplyType.BLOCK_STATUS,
          body.length,
        ),
        body,
      );
    });
  }
}

const noop = (): void => undefined;

/** Size of the aligned regions read buffers are carved from. */
const REGION = 4 * 1024 * 1024;

/** Read buffers one connection keeps for reuse (bytes). */
const POOL_LIMIT = 32 * 1024 * 1024;

/**
 * Reusable page-aligned read buffers, by power-of-two size (64 KiB and up): the kernel copies
 * into page-aligned memory about twice as fast, and reusing them spares the garbage collector
 * a large allocation per read. A buffer returns to the pool when its reply has been sent.
 */
class BufferPool {
  private readonly free = new Map<number, Uint8Array[]>();
  private total = 0;

  constructor(private readonly limit: number) {}

  get(n: number): { buf: Uint8Array; release: () => void } {
    if (n < 65536) return { buf: new Uint8Array(n), release: noop };
    const size = 2 ** Math.ceil(Math.log2(n));
    let list = this.free.get(size);
    if (list === undefined) this.free.set(size, (list = []));
    let slot = list.pop();
    if (slot === undefined) {
      if (this.total + size > this.limit) return { buf: new Uint8Array(n), release: noop };
      // Mapping a region costs about as much as a read: carve small slots out of 4 MiB ones.
      const region = Math.max(size, REGION);
      const mem = alignedBuffer(region);
      this.total += region;
      for (let at = size; at + size <= region; at += size) list.push(mem.subarray(at, at + size));
      slot = mem.subarray(0, size);
    }
    const mine = slot;
    const back = list;
    let released = false;
    return {
      buf: mine.subarray(0, n),
      release: () => {
        if (released) return;
        released = true;
        back.push(mine);
      },
    };
  }
}

/** Zero runs shorter than this stay inside data chunks (a hole chunk costs 32 bytes). */
const HOLE_BLOCK = 4096;

/**
 * Split `buf` (guest bytes from `offset`) into runs of data and runs of whole zero blocks
 * (4 KiB, aligned to the guest offset), in order; `start`/`end` index `buf`.
 */
function zeroRuns(
  buf: Uint8Array,
  offset: number,
): { start: number; end: number; zero: boolean }[] {
  const runs: { start: number; end: number; zero: boolean }[] = [];
  const push = (start: number, end: number, zero: boolean): void => {
    if (end <= start) return;
    const last = runs[runs.length - 1];
    if (last !== undefined && last.zero === zero) last.end = end;
    else runs.push({ start, end, zero });
  };
  // The first block ends at the next aligned guest offset.
  let at = 0;
  while (at < buf.length) {
    const blockEnd = Math.min(buf.length, at + HOLE_BLOCK - ((offset + at) % HOLE_BLOCK));
    const whole = blockEnd - at === HOLE_BLOCK;
    push(at, blockEnd, whole && isZero(buf.subarray(at, blockEnd)));
    at = blockEnd;
  }
  return runs;
}

/** True when every byte is zero. */
function isZero(data: Uint8Array): boolean {
  const words = data.byteOffset % 4 === 0 ? data.length >>> 2 : 0;
  if (words > 0) {
    const w = new Uint32Array(data.buffer, data.byteOffset, words);
    for (let i = 0; i < words; i++) if (w[i] !== 0) return false;
  }
  for (let i = words * 4; i < data.length; i++) if (data[i] !== 0) return false;
  return true;
}

/** Formats whose zero writes are metadata updates, faster than writing the bytes. */
function fastZeroes(image: WritableDiskImage): boolean {
  return image.format === "qcow2";
}
