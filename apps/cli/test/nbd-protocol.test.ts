/**
 * The NBD server's answers to what real clients never send (past-the-end, zero-length and
 * oversized requests, unknown commands, flags and options, malformed option data), many
 * requests in flight on one connection, hole chunks and unfragmented reads, simple replies,
 * fast zeroes; and afterwards `qemu-img check` finds the image clean.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  AllocationState,
  ClientFlag,
  ClientFlags,
  CmdFlag,
  NBD_MAX_PAYLOAD,
  NbdCmd,
  NbdError,
  NbdOpt,
  NbdRep,
  OptionReplyHeader,
  ReplyType,
  ServerGreeting,
  TransmissionFlag,
} from "@qimg/nbd";
import { serve, type NbdServer } from "@qimg/nbd/node";
import { seededRandom } from "@qimg/io";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { captureContext } from "../src/context.js";
import type { WritableDiskImage } from "../src/drivers.js";
import { openImage } from "../src/open.js";
import { NbdTestClient, lstr, optionBytes, rawConnect, u32 } from "./nbd-client.js";
import { hasQemu, qemuImg } from "./qemu.js";

const SIZE = 3 * 1024 * 1024 + 1536;
let dir = "";
let file = "";
let rawFile = "";
let image: WritableDiskImage;
let rawImage: WritableDiskImage;
let server: NbdServer;
let rawServer: NbdServer;
let socket = "";
let rawSocket = "";

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "qimg-nbd-proto-"));
  file = join(dir, "d.qcow2");
  rawFile = join(dir, "d.raw");
  const ctx = captureContext();
  const { runCli } = await import("../src/cli.js");
  expect(
    await runCli(
      ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", file, String(SIZE)],
      ctx,
    ),
  ).toBe(0);
  expect(await runCli(["create", "-q", "-f", "raw", rawFile, String(SIZE)], ctx)).toBe(0);
  image = await openImage(file, { format: "qcow2", readOnly: false, ctx });
  rawImage = await openImage(rawFile, { format: "raw", readOnly: false, ctx });
  socket = join(dir, "q.sock");
  rawSocket = join(dir, "r.sock");
  server = await serve(image, { socket, persistent: true, shared: 0 });
  rawServer = await serve(rawImage, { socket: rawSocket, persistent: true, shared: 0 });
});

afterAll(async () => {
  await server.close();
  await rawServer.close();
  await image.close();
  await rawImage.close();
  if (hasQemu) {
    const r = qemuImg(["check", "-f", "qcow2", file]);
    expect(r.stdout).toContain("No errors were found on the image.");
  }
  rmSync(dir, { recursive: true, force: true });
});

function pattern(n: number, seed: number): Uint8Array {
  const rnd = seededRandom(seed);
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rnd() * 256);
  return b;
}

describe("NBD requests", () => {
  it("validates offsets and lengths: past the end, 2^63, zero length, over 32 MiB", async () => {
    const c = await NbdTestClient.connect({ socket }, { contexts: ["base:allocation"] });
    expect(c.size).toBe(SIZE);
    expect((await c.request(NbdCmd.READ, SIZE - 512, 1024)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.READ, SIZE + 1, 0)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.READ, 1n << 63n, 512)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.READ, 0xffff_ffff_ffff_fe00n, 512)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.WRITE, SIZE - 2, 4, 0, new Uint8Array(4))).error).toBe(
      NbdError.ENOSPC,
    );
    expect((await c.request(NbdCmd.WRITE_ZEROES, SIZE, 1)).error).toBe(NbdError.ENOSPC);
    expect((await c.request(NbdCmd.TRIM, SIZE, 512)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.BLOCK_STATUS, SIZE - 1, 2)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.CACHE, SIZE, 2)).error).toBe(NbdError.EINVAL);
    // Zero lengths: success without effect (block status needs at least one byte).
    const r0 = await c.request(NbdCmd.READ, 100, 0);
    expect(r0.error).toBe(0);
    expect((await c.request(NbdCmd.WRITE, 100, 0, 0, new Uint8Array(0))).error).toBe(0);
    expect((await c.request(NbdCmd.TRIM, SIZE, 0)).error).toBe(0);
    expect((await c.request(NbdCmd.BLOCK_STATUS, 0, 0)).error).toBe(NbdError.EINVAL);
    // Over the maximum payload: refused; a write's payload is skipped so the stream stays in step.
    expect((await c.request(NbdCmd.READ, 0, NBD_MAX_PAYLOAD + 1)).error).toBe(NbdError.EINVAL);
    const big = new Uint8Array(NBD_MAX_PAYLOAD + 4096).fill(0xee);
    expect((await c.request(NbdCmd.WRITE, 0, big.length, 0, big)).error).toBe(NbdError.EINVAL);
    const after = await c.request(NbdCmd.READ, 0, 4096);
    expect(after.error).toBe(0);
    expect(after.data!.every((b) => b === 0)).toBe(true);
    // Zero writes and trims are not payloads: larger than 32 MiB is fine when inside the disk.
    expect((await c.request(NbdCmd.WRITE_ZEROES, 0, SIZE)).error).toBe(0);
    await c.disconnect();
  });

  it("refuses unknown commands and flags with EINVAL, and keeps serving", async () => {
    const c = await NbdTestClient.connect({ socket });
    expect((await c.request(99, 0, 512)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.RESIZE, 0, 0)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.READ, 0, 512, CmdFlag.FUA)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.FLUSH, 0, 0, CmdFlag.REQ_ONE)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.WRITE, 0, 1, CmdFlag.NO_HOLE, new Uint8Array(1))).error).toBe(
      NbdError.EINVAL,
    );
    // No metadata context selected: block status is refused.
    expect((await c.request(NbdCmd.BLOCK_STATUS, 0, 512)).error).toBe(NbdError.EINVAL);
    expect((await c.request(NbdCmd.READ, 0, 512)).error).toBe(0);
    await c.disconnect();
  });

  it("serves many requests in flight on one connection; reads see the writes", async () => {
    const c = await NbdTestClient.connect({ socket });
    expect(c.flags & TransmissionFlag.SEND_FUA).not.toBe(0);
    const writes = Array.from({ length: 80 }, (_, i) => ({
      off: i * 37_000 + (i % 7),
      data: pattern(1000 + i * 300, i),
    }));
    const replies = await Promise.all(
      writes.map((w, i) =>
        c.request(NbdCmd.WRITE, w.off, w.data.length, i % 5 === 0 ? CmdFlag.FUA : 0, w.data),
      ),
    );
    for (const r of replies) expect(r.error).toBe(0);
    expect((await c.request(NbdCmd.FLUSH, 0, 0)).error).toBe(0);
    // No two writes overlap (37 000 apart, at most 24 700 long).
    const model = new Uint8Array(SIZE);
    for (const w of writes) model.set(w.data, w.off);
    const reads = await Promise.all(
      Array.from({ length: 12 }, (_, k) => c.request(NbdCmd.READ, k * 250_000, 250_000)),
    );
    reads.forEach((r, k) => {
      expect(r.error).toBe(0);
      expect(
        Buffer.from(r.data!).equals(Buffer.from(model.subarray(k * 250_000, (k + 1) * 250_000))),
      ).toBe(true);
    });
    await c.disconnect();
  });

  it("structured reads send holes as OFFSET_HOLE chunks; DF sends one data chunk; simple replies work", async () => {
    const c = await NbdTestClient.connect({ socket }, { contexts: ["base:allocation"] });
    expect(c.flags & TransmissionFlag.SEND_DF).not.toBe(0);
    const at = 2 * 1024 * 1024;
    expect((await c.request(NbdCmd.WRITE_ZEROES, at, 64 * 1024)).error).toBe(0);
    expect((await c.request(NbdCmd.WRITE, at + 8192, 4096, 0, pattern(4096, 9))).error).toBe(0);
    const r = await c.request(NbdCmd.READ, at, 64 * 1024);
    expect(r.error).toBe(0);
    expect(r.chunks).toContain(ReplyType.OFFSET_HOLE);
    expect(r.chunks).toContain(ReplyType.OFFSET_DATA);
    expect(Buffer.from(r.data!.subarray(8192, 12288)).equals(Buffer.from(pattern(4096, 9)))).toBe(
      true,
    );
    const df = await c.request(NbdCmd.READ, at, 64 * 1024, CmdFlag.DF);
    expect(df.chunks).toEqual([ReplyType.OFFSET_DATA]);
    expect(Buffer.from(df.data!).equals(Buffer.from(r.data!))).toBe(true);
    // Block status: zero ranges carry ZERO; REQ_ONE gives one extent no longer than asked.
    const bs = await c.request(NbdCmd.BLOCK_STATUS, at, 8192);
    expect(bs.status[0]!.extents[0]![1] & AllocationState.ZERO).not.toBe(0);
    const one = await c.request(NbdCmd.BLOCK_STATUS, at, 100_000, CmdFlag.REQ_ONE);
    expect(one.status).toHaveLength(1);
    expect(one.status[0]!.extents).toHaveLength(1);
    expect(one.status[0]!.extents[0]![0]).toBeLessThanOrEqual(100_000);
    await c.disconnect();
    const s = await NbdTestClient.connect({ socket }, { structured: false });
    expect(s.flags & TransmissionFlag.SEND_DF).toBe(0);
    const sr = await s.request(NbdCmd.READ, at + 8192, 4096);
    expect(Buffer.from(sr.data!).equals(Buffer.from(pattern(4096, 9)))).toBe(true);
    expect((await s.request(NbdCmd.READ, at, 512, CmdFlag.DF)).error).toBe(NbdError.EINVAL);
    await s.disconnect();
  });

  it("FAST_ZERO: done on qcow2 (metadata), ENOTSUP on raw without changing it", async () => {
    const q = await NbdTestClient.connect({ socket });
    expect((await q.request(NbdCmd.WRITE_ZEROES, 0, 1 << 20, CmdFlag.FAST_ZERO)).error).toBe(0);
    await q.disconnect();
    const r = await NbdTestClient.connect({ socket: rawSocket });
    expect((await r.request(NbdCmd.WRITE, 0, 4, 0, new Uint8Array([9, 9, 9, 9]))).error).toBe(0);
    expect((await r.request(NbdCmd.WRITE_ZEROES, 0, 4096, CmdFlag.FAST_ZERO)).error).toBe(
      NbdError.ENOTSUP,
    );
    expect(Array.from((await r.request(NbdCmd.READ, 0, 4)).data!)).toEqual([9, 9, 9, 9]);
    expect((await r.request(NbdCmd.WRITE_ZEROES, 0, 4096, CmdFlag.NO_HOLE)).error).toBe(0);
    expect(Array.from((await r.request(NbdCmd.READ, 0, 4)).data!)).toEqual([0, 0, 0, 0]);
    await r.disconnect();
  });
});

describe("--detect-zeroes", () => {
  it.each(["off", "on"] as const)(
    "%s: an all-zero write leaves data, or becomes a zero write",
    async (mode) => {
      const f = join(dir, `dz-${mode}.qcow2`);
      const ctx = captureContext();
      const { runCli } = await import("../src/cli.js");
      expect(await runCli(["create", "-q", "-f", "qcow2", f, "1M"], ctx)).toBe(0);
      const img = await openImage(f, { format: "qcow2", readOnly: false, ctx });
      const sock = join(dir, `dz-${mode}.sock`);
      const srv = await serve(img, { socket: sock, detectZeroes: mode });
      const c = await NbdTestClient.connect({ socket: sock });
      expect((await c.request(NbdCmd.WRITE, 65536, 65536, 0, new Uint8Array(65536))).error).toBe(0);
      await c.disconnect();
      await srv.done;
      const s = await img.blockStatus(65536, 65536);
      expect(s.zero).toBe(mode === "on");
      expect(s.data).toBe(mode === "off");
      await img.close();
    },
  );
});

describe("NBD option haggling", () => {
  async function handshake(): Promise<Awaited<ReturnType<typeof rawConnect>>> {
    const conn = await rawConnect({ socket });
    ServerGreeting.decode((await conn.channel.read(ServerGreeting.size))!);
    conn.channel.write(ClientFlags.encode({ flags: ClientFlag.FIXED_NEWSTYLE }));
    return conn;
  }
  async function reply(
    conn: Awaited<ReturnType<typeof rawConnect>>,
  ): Promise<{ option: number; type: number; data: Uint8Array }> {
    const h = OptionReplyHeader.decode((await conn.channel.read(OptionReplyHeader.size))!);
    return { option: h.option, type: h.type, data: (await conn.channel.read(h.length))! };
  }

  it("answers unknown and malformed options with errors and still lets the client GO", async () => {
    const conn = await handshake();
    conn.channel.write(optionBytes(99, new Uint8Array(10)));
    expect((await reply(conn)).type).toBe(NbdRep.ERR_UNSUP);
    conn.channel.write(optionBytes(NbdOpt.STARTTLS));
    expect((await reply(conn)).type).toBe(NbdRep.ERR_UNSUP);
    // Meta contexts need structured replies first.
    conn.channel.write(
      optionBytes(
        NbdOpt.SET_META_CONTEXT,
        new Uint8Array([...lstr(""), ...u32(1), ...lstr("base:allocation")]),
      ),
    );
    expect((await reply(conn)).type).toBe(NbdRep.ERR_INVALID);
    conn.channel.write(optionBytes(NbdOpt.STRUCTURED_REPLY, new Uint8Array(1)));
    expect((await reply(conn)).type).toBe(NbdRep.ERR_INVALID);
    conn.channel.write(optionBytes(NbdOpt.STRUCTURED_REPLY));
    expect((await reply(conn)).type).toBe(NbdRep.ACK);
    // A name length running past the data; a query count that lies.
    conn.channel.write(optionBytes(NbdOpt.GO, new Uint8Array([0, 0, 1, 0, 0, 0])));
    expect((await reply(conn)).type).toBe(NbdRep.ERR_INVALID);
    conn.channel.write(
      optionBytes(NbdOpt.LIST_META_CONTEXT, new Uint8Array([...lstr(""), ...u32(5)])),
    );
    expect((await reply(conn)).type).toBe(NbdRep.ERR_INVALID);
    conn.channel.write(optionBytes(NbdOpt.INFO, new Uint8Array([...lstr("nope"), 0, 0])));
    expect((await reply(conn)).type).toBe(NbdRep.ERR_UNKNOWN);
    conn.channel.write(optionBytes(NbdOpt.LIST, new Uint8Array(3)));
    expect((await reply(conn)).type).toBe(NbdRep.ERR_INVALID);
    // Listing contexts: all of them for no query, base:allocation for "base:".
    conn.channel.write(
      optionBytes(
        NbdOpt.LIST_META_CONTEXT,
        new Uint8Array([...lstr(""), ...u32(1), ...lstr("base:")]),
      ),
    );
    const listed = await reply(conn);
    expect(listed.type).toBe(NbdRep.META_CONTEXT);
    expect(new TextDecoder().decode(listed.data.subarray(4))).toBe("base:allocation");
    expect((await reply(conn)).type).toBe(NbdRep.ACK);
    conn.channel.write(optionBytes(NbdOpt.GO, new Uint8Array([...lstr(""), 0, 0])));
    const info = await reply(conn);
    expect(info.type).toBe(NbdRep.INFO);
    for (let r = await reply(conn); r.type !== NbdRep.ACK; r = await reply(conn))
      expect(r.type).toBe(NbdRep.INFO);
    conn.socket.destroy();
  });

  it("ends the connection on a bad option magic or unknown client flags, and the server keeps serving", async () => {
    const a = await handshake();
    a.channel.write(new Uint8Array(16).fill(0x41));
    expect(await a.channel.read(1)).toBeNull();
    const b = await rawConnect({ socket });
    await b.channel.read(ServerGreeting.size);
    b.channel.write(ClientFlags.encode({ flags: 0x80 }));
    expect(await b.channel.read(1)).toBeNull();
    const c = await NbdTestClient.connect({ socket });
    expect((await c.request(NbdCmd.READ, 0, 512)).error).toBe(0);
    await c.disconnect();
  });

  it("NBD_OPT_ABORT is acknowledged and ends the session", async () => {
    const conn = await handshake();
    conn.channel.write(optionBytes(NbdOpt.ABORT));
    expect((await reply(conn)).type).toBe(NbdRep.ACK);
    expect(await conn.channel.read(1)).toBeNull();
  });
});
