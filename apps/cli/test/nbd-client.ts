/**
 * A small NBD client for tests that need what real clients never send: bad offsets, zero and
 * oversized lengths, unknown commands and options, many requests in flight, garbage. Built on
 * the package's own codecs and socket channel, and checked against real clients elsewhere.
 */
import { connect, type Socket } from "node:net";
import {
  ClientFlag,
  ClientFlags,
  NBD_OPTS_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NbdCmd,
  NbdOpt,
  NbdRep,
  OptionHeader,
  OptionReplyHeader,
  ReplyFlag,
  ReplyType,
  RequestHeader,
  ServerGreeting,
  SimpleReply,
  StructuredReplyHeader,
} from "@qimg/nbd";
import { SocketChannel } from "@qimg/nbd/node";

/** Where a server listens. */
export type Endpoint =
  { readonly socket: string } | { readonly host: string; readonly port: number };

/** One answered request. */
export interface NbdReply {
  /** Error value (0 on success). */
  readonly error: number;
  /** The bytes read (reads only), holes filled with zeros. */
  readonly data?: Uint8Array;
  /** Chunk types received (structured replies). */
  readonly chunks: number[];
  /** Block status payloads (context id, then [length, flags] pairs). */
  readonly status: { id: number; extents: [number, number][] }[];
}

/** Open a raw connection to `ep` and the channel over it. */
export async function rawConnect(
  ep: Endpoint,
): Promise<{ socket: Socket; channel: SocketChannel }> {
  const socket = "socket" in ep ? connect(ep.socket) : connect(ep.port, ep.host);
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  return { socket, channel: new SocketChannel(socket) };
}

function option(code: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(16 + data.length);
  OptionHeader.encode({ magic: NBD_OPTS_MAGIC, option: code, length: data.length }, out);
  out.set(data, 16);
  return out;
}

/** The 4 big-endian bytes of `n` (NBD's u32). */
export function u32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n, false);
  return b;
}

/** `parts` one after another in a new array. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const utf8 = new TextEncoder();

/** The bytes of a length-prefixed string. */
export function lstr(s: string): Uint8Array {
  const b = utf8.encode(s);
  return concat(u32(b.length), b);
}

/** An option request's bytes (for tests that send options by hand). */
export const optionBytes = option;

/** A connected client in transmission phase. */
export class NbdTestClient {
  private cookie = 1n;
  private readonly pending = new Map<
    bigint,
    {
      type: number;
      length: number;
      offset: number;
      resolve: (r: NbdReply) => void;
      reply: NbdReply & { data?: Uint8Array };
    }
  >();
  private readLoop: Promise<void> | undefined;

  private constructor(
    readonly socket: Socket,
    readonly channel: SocketChannel,
    readonly size: number,
    readonly flags: number,
    readonly structured: boolean,
  ) {}

  /** Handshake (fixed newstyle, optional structured replies and contexts, then GO). */
  static async connect(
    ep: Endpoint,
    options: { exportName?: string; structured?: boolean; contexts?: string[] } = {},
  ): Promise<NbdTestClient> {
    const { socket, channel } = await rawConnect(ep);
    const greet = await channel.read(ServerGreeting.size);
    if (greet === null) throw new Error("no greeting");
    ServerGreeting.decode(greet);
    channel.write(ClientFlags.encode({ flags: ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES }));
    const replies = async (): Promise<{ type: number; data: Uint8Array }[]> => {
      const out: { type: number; data: Uint8Array }[] = [];
      for (;;) {
        const h = OptionReplyHeader.decode((await channel.read(OptionReplyHeader.size))!);
        const data = (await channel.read(h.length))!;
        out.push({ type: h.type, data });
        if (h.type !== NbdRep.INFO && h.type !== NbdRep.META_CONTEXT && h.type !== NbdRep.SERVER)
          return out;
      }
    };
    const structured = options.structured ?? true;
    if (structured) {
      channel.write(option(NbdOpt.STRUCTURED_REPLY));
      const r = await replies();
      if (r[r.length - 1]!.type !== NbdRep.ACK) throw new Error("structured replies refused");
    }
    const name = options.exportName ?? "";
    if (options.contexts !== undefined) {
      channel.write(
        option(
          NbdOpt.SET_META_CONTEXT,
          concat(lstr(name), u32(options.contexts.length), ...options.contexts.map(lstr)),
        ),
      );
      await replies();
    }
    channel.write(option(NbdOpt.GO, concat(lstr(name), new Uint8Array(2))));
    const r = await replies();
    if (r[r.length - 1]!.type !== NbdRep.ACK)
      throw new Error(`GO refused: 0x${r[r.length - 1]!.type.toString(16)}`);
    const info = r.find((x) => x.type === NbdRep.INFO && x.data[0] === 0 && x.data[1] === 0)!;
    const v = new DataView(info.data.buffer, info.data.byteOffset);
    const size = Number(v.getBigUint64(2, false));
    const flags = v.getUint16(10, false);
    return new NbdTestClient(socket, channel, size, flags, structured);
  }

  /** Send a request; resolves with its reply. */
  request(
    type: number,
    offset: number | bigint,
    length: number,
    flags = 0,
    payload?: Uint8Array,
  ): Promise<NbdReply> {
    const cookie = this.cookie++;
    const header = RequestHeader.encode({
      magic: NBD_REQUEST_MAGIC,
      flags,
      type,
      cookie,
      offset: BigInt(offset),
      length,
    });
    const p = new Promise<NbdReply>((resolve) => {
      this.pending.set(cookie, {
        type,
        length,
        offset: Number(offset),
        resolve,
        reply: { error: 0, chunks: [], status: [] },
      });
    });
    this.channel.write(header, ...(payload === undefined ? [] : [payload]));
    this.readLoop ??= this.loop();
    return p;
  }

  private async loop(): Promise<void> {
    for (;;) {
      const m = await this.channel.read(4);
      if (m === null) break;
      const magic = new DataView(m.buffer, m.byteOffset).getUint32(0, false);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        const rest = (await this.channel.read(12))!;
        const s = SimpleReply.decode(concat(m, rest));
        const p = this.pending.get(s.cookie)!;
        let data: Uint8Array | undefined;
        if (p.type === NbdCmd.READ && s.error === 0)
          data = (await this.channel.read(p.length)) ?? undefined;
        this.pending.delete(s.cookie);
        p.resolve({ error: s.error, chunks: [], status: [], ...(data ? { data } : {}) });
        continue;
      }
      const rest = (await this.channel.read(16))!;
      const h = StructuredReplyHeader.decode(concat(m, rest));
      const body = (await this.channel.read(h.length))!;
      const p = this.pending.get(h.cookie)!;
      const reply = p.reply as {
        error: number;
        data?: Uint8Array;
        chunks: number[];
        status: NbdReply["status"];
      };
      reply.chunks.push(h.type);
      const v = new DataView(body.buffer, body.byteOffset, body.byteLength);
      if (p.type === NbdCmd.READ && reply.data === undefined) reply.data = new Uint8Array(p.length);
      if (h.type === ReplyType.OFFSET_DATA) {
        const off = Number(v.getBigUint64(0, false));
        reply.data!.set(body.subarray(8), off - p.offset);
      } else if (h.type === ReplyType.BLOCK_STATUS) {
        const extents: [number, number][] = [];
        for (let i = 4; i < body.length; i += 8)
          extents.push([v.getUint32(i, false), v.getUint32(i + 4, false)]);
        reply.status.push({ id: v.getUint32(0, false), extents });
      } else if (h.type === ReplyType.ERROR || h.type === ReplyType.ERROR_OFFSET) {
        reply.error = v.getUint32(0, false);
      }
      if ((h.flags & ReplyFlag.DONE) !== 0) {
        this.pending.delete(h.cookie);
        p.resolve(reply);
      }
    }
    for (const p of this.pending.values()) p.resolve({ error: -1, chunks: [], status: [] });
    this.pending.clear();
  }

  /** Soft disconnect. */
  async disconnect(): Promise<void> {
    this.channel.write(
      RequestHeader.encode({
        magic: NBD_REQUEST_MAGIC,
        flags: 0,
        type: NbdCmd.DISC,
        cookie: 0n,
        offset: 0n,
        length: 0,
      }),
    );
    this.channel.close();
    await new Promise<void>((r) => {
      if (this.socket.closed) r();
      else this.socket.once("close", () => r());
    });
  }
}
