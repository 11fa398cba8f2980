/**
 * `@qimg/nbd/node`: an NBD server over `node:net` (a Unix socket or TCP) for any
 * `WritableDiskImage`, with qemu-nbd's choices: one export, at most `shared` clients at a time
 * (the others wait in the listen backlog), ending after the last client unless `persistent`.
 */
import { lstatSync, unlinkSync } from "node:fs";
import { createServer, type AddressInfo, type Server, type Socket } from "node:net";
import type { WritableDiskImage } from "@qimg/io";
import {
  NbdSession,
  type ByteChannel,
  type DetectZeroes,
  type DirtyBitmapSource,
  type NbdExport,
} from "./session.js";

/** Output queued on a socket beyond which the server stops taking requests from it. */
const OUTPUT_HIGH_WATER = 64 * 1024 * 1024;
/** Input buffered from a socket beyond which it is paused. */
const INPUT_HIGH_WATER = 40 * 1024 * 1024;

/** A {@link ByteChannel} over a connected socket. */
export class SocketChannel implements ByteChannel {
  private readonly chunks: Uint8Array[] = [];
  private buffered = 0;
  private ended = false;
  private readAborted = false;
  private waiter: (() => void) | undefined;

  /** Wrap a connected socket. */
  constructor(private readonly socket: Socket) {
    socket.on("data", (b: Buffer) => {
      this.chunks.push(b);
      this.buffered += b.length;
      if (this.buffered > INPUT_HIGH_WATER) socket.pause();
      this.wake();
    });
    const end = (): void => {
      this.ended = true;
      this.wake();
    };
    socket.on("end", end);
    socket.on("close", end);
    socket.on("error", end);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  private async fill(n: number): Promise<boolean> {
    while (this.buffered < n || this.readAborted) {
      if (this.ended || this.readAborted) return false;
      this.socket.resume();
      await new Promise<void>((r) => (this.waiter = r));
    }
    return true;
  }

  private take(n: number): Uint8Array {
    const first = this.chunks[0]!;
    let out: Uint8Array;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = new Uint8Array(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - at);
        out.set(c.subarray(0, k), at);
        at += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    if (this.buffered <= INPUT_HIGH_WATER) this.socket.resume();
    return out;
  }

  /** See {@link ByteChannel.read}. */
  async read(n: number): Promise<Uint8Array | null> {
    if (n === 0) return new Uint8Array(0);
    if (!(await this.fill(n))) return null;
    return this.take(n);
  }

  /** See {@link ByteChannel.skip}. */
  async skip(n: number): Promise<boolean> {
    let left = n;
    while (left > 0) {
      if (!(await this.fill(1))) return false;
      const k = Math.min(left, this.buffered);
      this.take(k);
      left -= k;
    }
    return true;
  }

  /** See {@link ByteChannel.write}. */
  write(...parts: Uint8Array[]): void {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    if (parts.length > 1) this.socket.cork();
    for (const p of parts) if (p.length > 0) this.socket.write(p);
    if (parts.length > 1) this.socket.uncork();
  }

  /** See {@link ByteChannel.send}. */
  send(parts: readonly Uint8Array[], done: () => void): void {
    if (this.socket.destroyed || this.socket.writableEnded) {
      done();
      return;
    }
    this.socket.cork();
    for (let i = 0; i < parts.length - 1; i++)
      if (parts[i]!.length > 0) this.socket.write(parts[i]!);
    this.socket.write(parts[parts.length - 1] ?? new Uint8Array(0), () => done());
    this.socket.uncork();
  }

  /** See {@link ByteChannel.drained}. */
  async drained(): Promise<void> {
    while (this.socket.writableLength > OUTPUT_HIGH_WATER && !this.socket.destroyed) {
      await new Promise<void>((r) => {
        const done = (): void => {
          this.socket.off("drain", done);
          this.socket.off("close", done);
          r();
        };
        this.socket.once("drain", done);
        this.socket.once("close", done);
      });
    }
  }

  /** See {@link ByteChannel.abortRead}. */
  abortRead(): void {
    this.readAborted = true;
    this.socket.pause();
    this.wake();
  }

  /** See {@link ByteChannel.close}. */
  close(): void {
    this.ended = true;
    this.wake();
    if (!this.socket.destroyed) this.socket.end();
    // Keep reading (and dropping) what the peer still sends, so its end of the stream is
    // seen and the socket closes: a paused socket would neither close nor keep Node alive.
    this.chunks.length = 0;
    this.buffered = 0;
    this.socket.removeAllListeners("data");
    this.socket.on("data", () => undefined);
    this.socket.resume();
    // A peer that does not read what is queued must not keep the socket forever.
    setTimeout(() => this.socket.destroy(), 5000).unref();
  }
}

/** Options of {@link serve}. */
export interface ServeOptions {
  /** Listen on this Unix socket path (qemu-nbd `-k`); otherwise TCP. */
  readonly socket?: string | undefined;
  /** TCP port (qemu-nbd `-p`; default 10809, 0 = any free port). */
  readonly port?: number | undefined;
  /**
   * TCP address to bind (qemu-nbd `-b`; default `127.0.0.1`). Anything else exposes the
   * image, unauthenticated and unencrypted, to whoever can reach that address.
   */
  readonly host?: string | undefined;
  /** The export's name (qemu-nbd `-x`; default ""). */
  readonly exportName?: string | undefined;
  /** The export's description (qemu-nbd `-D`). */
  readonly description?: string | undefined;
  /** Refuse writes (qemu-nbd `-r`; default: as the image was opened). */
  readonly readOnly?: boolean | undefined;
  /** Clients served at once (qemu-nbd `-e`; default 1, 0 = no limit). */
  readonly shared?: number | undefined;
  /** Keep serving after the last client leaves (qemu-nbd `-t`). */
  readonly persistent?: boolean | undefined;
  /** Persistent bitmaps offered as `qemu:dirty-bitmap:NAME` (qemu-nbd `-B`). */
  readonly bitmaps?: readonly DirtyBitmapSource[] | undefined;
  /** Pass trims and unmapping zero writes on to the image (qemu-nbd `--discard=unmap`). */
  readonly discard?: boolean | undefined;
  /** Turn all-zero writes into zero writes (qemu-nbd `--detect-zeroes`; default "off"). */
  readonly detectZeroes?: DetectZeroes | undefined;
  /** Flush after every write (qemu-nbd `--cache=writethrough`). */
  readonly writethrough?: boolean | undefined;
  /** Drop clients that do not finish the handshake in this time (ms; default 10000, 0 = never). */
  readonly handshakeTimeoutMs?: number | undefined;
  /** Errors of single requests and connections (the server keeps running). */
  readonly onError?: ((error: unknown) => void) | undefined;
}

/** A running server (see {@link serve}). */
export interface NbdServer {
  /** Where it listens: the socket path, or the TCP address and port. */
  readonly address: { readonly socket?: string; readonly host?: string; readonly port?: number };
  /** Connections being served now. */
  readonly connections: number;
  /**
   * Resolves once the server has stopped: after {@link NbdServer.close}, or (not persistent)
   * when the last client has left.
   */
  readonly done: Promise<void>;
  /**
   * Stop: no new connections; requests already started finish and are answered; then every
   * connection closes and the image is flushed (when writable). The image stays open: the
   * caller closes it.
   */
  close(): Promise<void>;
}

/**
 * Serve `image` over NBD until {@link NbdServer.close} (or, unless `persistent`, until the
 * last client has left). Resolves once the server listens.
 *
 * ```ts no-run
 * const server = await serve(image, { socket: "/tmp/disk.sock" });
 * await server.done;
 * ```
 */
export async function serve(
  image: WritableDiskImage,
  options: ServeOptions = {},
): Promise<NbdServer> {
  const exp: NbdExport = {
    name: options.exportName ?? "",
    description: options.description,
    image,
    readOnly: options.readOnly ?? image.readOnly,
    // As qemu-nbd: only when more than one client may connect (with -e 1 a client opening
    // several connections would wait forever for the second); safe then because every
    // connection shares the one image object, so a flush on one covers the writes of all.
    multiConn: (options.shared ?? 1) !== 1,
    discard: options.discard ?? false,
    detectZeroes: options.detectZeroes ?? "off",
    writethrough: options.writethrough ?? false,
    bitmaps: options.bitmaps ?? [],
  };
  const shared = options.shared ?? 1;
  const persistent = options.persistent ?? false;
  const onError = options.onError;
  const sessions = new Set<NbdSession>();
  const waiting: Socket[] = [];
  const writes = new Set<Promise<unknown>>();
  let closing: Promise<void> | undefined;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => (resolveDone = r));

  const start = (socket: Socket): void => {
    socket.setNoDelay(true);
    const session = new NbdSession(new SocketChannel(socket), [exp], {
      onError,
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? 10_000,
      trackWrite: (p) => {
        writes.add(p);
        void p.finally(() => writes.delete(p));
      },
    });
    sessions.add(session);
    void session.run().then(() => {
      // The session has ended the socket (queued replies still go out; see SocketChannel.close).
      sessions.delete(session);
      const next = waiting.shift();
      if (next !== undefined && closing === undefined) start(next);
      else if (
        sessions.size === 0 &&
        waiting.length === 0 &&
        !persistent &&
        closing === undefined
      ) {
        void stop();
      }
    });
  };

  const server: Server = createServer({ pauseOnConnect: true }, (socket) => {
    socket.on("error", () => undefined);
    if (closing !== undefined) {
      socket.destroy();
      return;
    }
    if (shared > 0 && sessions.size >= shared) waiting.push(socket);
    else start(socket);
  });
  server.on("error", (e) => onError?.(e));

  const stop = (): Promise<void> => {
    closing ??= (async () => {
      // close() only reports once every connection has ended: wait for that last.
      const listening = new Promise<void>((r) => server.close(() => r()));
      for (const s of waiting.splice(0)) s.destroy();
      for (const s of sessions) s.stop();
      while (sessions.size > 0 || writes.size > 0) {
        await Promise.allSettled([...writes]);
        await new Promise((r) => setTimeout(r, 5));
      }
      if (!exp.readOnly && !image.readOnly) {
        try {
          await image.flush();
        } catch (e) {
          onError?.(e);
        }
      }
      await listening;
      if (options.socket !== undefined) removeSocket(options.socket);
      resolveDone();
    })();
    return closing;
  };

  if (options.socket !== undefined) removeSocket(options.socket);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    const ready = (): void => {
      server.off("error", reject);
      resolve();
    };
    if (options.socket !== undefined) server.listen(options.socket, ready);
    else server.listen(options.port ?? 10809, options.host ?? "127.0.0.1", ready);
  });
  const a = server.address();
  const address =
    options.socket !== undefined
      ? { socket: options.socket }
      : { host: (a as AddressInfo).address, port: (a as AddressInfo).port };
  return {
    address,
    get connections() {
      return sessions.size;
    },
    done,
    close: stop,
  };
}

/** Remove a stale Unix socket at `path` (never a regular file). */
function removeSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // absent: nothing to remove
  }
}

export type { DirtyBitmapSource, DetectZeroes } from "./session.js";
