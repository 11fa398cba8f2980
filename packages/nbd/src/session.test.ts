/**
 * The session over an in-memory channel (no sockets: the handler is platform-neutral): the
 * old `NBD_OPT_EXPORT_NAME` path with and without the 124 zero bytes, simple replies, and a
 * write that reaches the image.
 */
import { MemoryBackend, RawImage } from "@qimg/io";
import { describe, expect, it } from "vitest";
import { ClientFlag, NBD_OPTS_MAGIC, NBD_REQUEST_MAGIC, NbdCmd, NbdOpt } from "./spec/constants.js";
import {
  ClientFlags,
  ExportNameReply,
  OptionHeader,
  RequestHeader,
  ServerGreeting,
  SimpleReply,
} from "./spec/messages.js";
import { NbdSession, type ByteChannel, type NbdExport } from "./session.js";

/** A channel whose input is fed by the test and whose output the test reads. */
class MemoryChannel implements ByteChannel {
  private input = new Uint8Array(0);
  private ended = false;
  private waiter: (() => void) | undefined;
  readonly output: Uint8Array[] = [];
  closed = false;

  feed(bytes: Uint8Array): void {
    const n = new Uint8Array(this.input.length + bytes.length);
    n.set(this.input);
    n.set(bytes, this.input.length);
    this.input = n;
    this.waiter?.();
  }
  end(): void {
    this.ended = true;
    this.waiter?.();
  }
  async read(n: number): Promise<Uint8Array | null> {
    while (this.input.length < n) {
      if (this.ended) return null;
      await new Promise<void>((r) => (this.waiter = r));
    }
    const out = this.input.slice(0, n);
    this.input = this.input.slice(n);
    return out;
  }
  async skip(n: number): Promise<boolean> {
    return (await this.read(n)) !== null;
  }
  write(...parts: Uint8Array[]): void {
    for (const p of parts) this.output.push(p);
  }
  send(parts: readonly Uint8Array[], done: () => void): void {
    this.write(...parts.map((p) => p.slice()));
    done();
  }
  drained(): Promise<void> {
    return Promise.resolve();
  }
  abortRead(): void {
    this.end();
  }
  close(): void {
    this.closed = true;
    this.end();
  }
  bytes(): Uint8Array {
    const all = new Uint8Array(this.output.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of this.output) {
      all.set(p, at);
      at += p.length;
    }
    return all;
  }
}

async function exportOf(size: number): Promise<NbdExport> {
  const backend = new MemoryBackend();
  await backend.write(0, new Uint8Array(size));
  const image = await RawImage.open(backend, { readOnly: false });
  return {
    name: "m",
    image,
    readOnly: false,
    multiConn: false,
    discard: false,
    detectZeroes: "off",
    writethrough: false,
    bitmaps: [],
  };
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 5));

describe("NbdSession over any byte channel", () => {
  it.each([true, false])(
    "NBD_OPT_EXPORT_NAME (no zeroes: %s), then simple replies",
    async (noZeroes) => {
      const exp = await exportOf(8192);
      const ch = new MemoryChannel();
      const done = new NbdSession(ch, [exp]).run();
      ch.feed(
        ClientFlags.encode({
          flags: ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0),
        }),
      );
      const name = new TextEncoder().encode("m");
      ch.feed(
        OptionHeader.encode({ magic: NBD_OPTS_MAGIC, option: NbdOpt.EXPORT_NAME, length: 1 }),
      );
      ch.feed(name);
      const req = (type: number, offset: number, length: number, cookie: bigint): Uint8Array =>
        RequestHeader.encode({
          magic: NBD_REQUEST_MAGIC,
          flags: 0,
          type,
          cookie,
          offset: BigInt(offset),
          length,
        });
      ch.feed(req(NbdCmd.WRITE, 100, 3, 1n));
      ch.feed(new Uint8Array([7, 8, 9]));
      await tick();
      ch.feed(req(NbdCmd.READ, 99, 5, 2n));
      await tick();
      ch.feed(req(NbdCmd.DISC, 0, 0, 3n));
      await done;
      expect(ch.closed).toBe(true);
      const out = ch.bytes();
      let at = ServerGreeting.size;
      const reply = ExportNameReply.decode(out, at);
      expect(reply.size).toBe(8192);
      at += ExportNameReply.size + (noZeroes ? 0 : 124);
      expect(SimpleReply.decode(out, at)).toMatchObject({ error: 0, cookie: 1n });
      at += SimpleReply.size;
      expect(SimpleReply.decode(out, at)).toMatchObject({ error: 0, cookie: 2n });
      at += SimpleReply.size;
      expect(Array.from(out.subarray(at, at + 5))).toEqual([0, 7, 8, 9, 0]);
      expect(out.length).toBe(at + 5);
    },
  );

  it("an unknown export name ends the session without a reply", async () => {
    const exp = await exportOf(512);
    const ch = new MemoryChannel();
    const done = new NbdSession(ch, [exp]).run();
    ch.feed(ClientFlags.encode({ flags: ClientFlag.FIXED_NEWSTYLE }));
    ch.feed(OptionHeader.encode({ magic: NBD_OPTS_MAGIC, option: NbdOpt.EXPORT_NAME, length: 1 }));
    ch.feed(new Uint8Array([0x78]));
    await done;
    expect(ch.bytes().length).toBe(ServerGreeting.size);
  });
});
