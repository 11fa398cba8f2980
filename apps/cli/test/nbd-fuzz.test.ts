/**
 * Protocol fuzzing of the NBD server (seeded; `QIMG_SEED` picks another seed, `QIMG_LONG=1`
 * runs longer): random bytes, mutated valid handshakes and request streams, well-framed
 * requests with random fields, clients that vanish mid-request or stall. After every round a
 * well-behaved client must still connect and read what the model says; at the end the
 * server is still answering and `qemu-img check` finds the image clean.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  ClientFlag,
  ClientFlags,
  NBD_REQUEST_MAGIC,
  NbdCmd,
  NbdOpt,
  RequestHeader,
} from "@qimg/nbd";
import { serve, type NbdServer } from "@qimg/nbd/node";
import { seededRandom } from "@qimg/io";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli } from "../src/cli.js";
import { captureContext } from "../src/context.js";
import type { WritableDiskImage } from "../src/drivers.js";
import { openImage } from "../src/open.js";
import { NbdTestClient, concat, lstr, optionBytes, rawConnect, u32 } from "./nbd-client.js";
import { hasQemu, qemuImg } from "./qemu.js";

const SEED = Number(process.env.QIMG_SEED ?? 20261202);
const ROUNDS = process.env.QIMG_LONG === "1" ? 3000 : 400;
const SIZE = 2 * 1024 * 1024 + 512;

let dir = "";
let file = "";
let image: WritableDiskImage;
let server: NbdServer;
let socket = "";
const errors: unknown[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "qimg-nbd-fuzz-"));
  file = join(dir, "f.qcow2");
  socket = join(dir, "f.sock");
  const ctx = captureContext();
  expect(
    await runCli(
      [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,lazy_refcounts=on",
        file,
        String(SIZE),
      ],
      ctx,
    ),
  ).toBe(0);
  image = await openImage(file, { format: "qcow2", readOnly: false, ctx });
  server = await serve(image, {
    socket,
    persistent: true,
    shared: 0,
    discard: true,
    handshakeTimeoutMs: 500,
    onError: (e) => errors.push(e),
  });
});

afterAll(async () => {
  rmSync(dir, { recursive: true, force: true });
});

/** A valid client stream: flags, structured replies, contexts, GO, then some requests. */
function validStream(rnd: () => number): Uint8Array {
  const parts = [
    ClientFlags.encode({ flags: ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES }),
    optionBytes(NbdOpt.STRUCTURED_REPLY),
    optionBytes(NbdOpt.SET_META_CONTEXT, concat(lstr(""), u32(1), lstr("base:allocation"))),
    optionBytes(NbdOpt.GO, concat(lstr(""), new Uint8Array(2))),
  ];
  for (let i = 0; i < 1 + Math.floor(rnd() * 6); i++) parts.push(randomRequest(rnd, true));
  return concat(...parts);
}

/** A well-framed request; `sane` keeps offsets inside the disk (so it may really write). */
function randomRequest(rnd: () => number, sane: boolean): Uint8Array {
  const types = [
    NbdCmd.READ,
    NbdCmd.WRITE,
    NbdCmd.FLUSH,
    NbdCmd.TRIM,
    NbdCmd.CACHE,
    NbdCmd.WRITE_ZEROES,
    NbdCmd.BLOCK_STATUS,
    9,
    0xffff,
  ];
  const type = types[Math.floor(rnd() * types.length)]!;
  const length = sane ? Math.floor(rnd() * 70_000) : Math.floor(rnd() * 2 ** 32);
  const offset = sane
    ? BigInt(Math.floor(rnd() * SIZE))
    : BigInt(Math.floor(rnd() * 2 ** 53)) * (rnd() < 0.2 ? 2048n : 1n);
  const flags = rnd() < 0.7 ? 0 : Math.floor(rnd() * 0x10000);
  const header = RequestHeader.encode({
    magic: NBD_REQUEST_MAGIC,
    flags,
    type,
    cookie: BigInt(Math.floor(rnd() * 2 ** 48)),
    offset,
    length,
  });
  if (type !== NbdCmd.WRITE) return header;
  // Write payloads: complete when small, cut short otherwise (the client then vanishes).
  const payload = new Uint8Array(Math.min(length, 80_000)).fill(Math.floor(rnd() * 256));
  return concat(header, payload);
}

function mutate(bytes: Uint8Array, rnd: () => number): Uint8Array {
  const out = bytes.slice();
  const n = 1 + Math.floor(rnd() * 8);
  for (let i = 0; i < n; i++) {
    const at = Math.floor(rnd() * out.length);
    const how = rnd();
    if (how < 0.5) out[at] = Math.floor(rnd() * 256);
    else if (how < 0.8) out[at] = out[at]! ^ (1 << Math.floor(rnd() * 8));
    else return out.subarray(0, at); // truncated: the client vanishes mid-message
  }
  return out;
}

/** Send `bytes` after the greeting, read whatever comes back for a while, then hang up. */
async function throwAt(bytes: Uint8Array, rnd: () => number): Promise<void> {
  const { socket: s, channel } = await rawConnect({ socket });
  s.on("error", () => undefined);
  await channel.read(18);
  // In pieces, as a slow network would deliver them.
  for (let at = 0; at < bytes.length;) {
    const n = 1 + Math.floor(rnd() * 4096);
    channel.write(bytes.subarray(at, at + n));
    at += n;
  }
  await new Promise((r) => setTimeout(r, Math.floor(rnd() * 15)));
  s.destroy();
}

async function healthy(): Promise<void> {
  const c = await NbdTestClient.connect({ socket }, { contexts: ["base:allocation"] });
  const marker = new TextEncoder().encode("still here");
  expect((await c.request(NbdCmd.WRITE, SIZE - 512, marker.length, 0, marker)).error).toBe(0);
  const r = await c.request(NbdCmd.READ, SIZE - 512, marker.length);
  expect(r.error).toBe(0);
  expect(new TextDecoder().decode(r.data)).toBe("still here");
  expect((await c.request(NbdCmd.BLOCK_STATUS, 0, SIZE)).error).toBe(0);
  await c.disconnect();
}

describe("NBD protocol fuzz", () => {
  it(`survives ${ROUNDS} rounds of random and mutated bytes (seed ${SEED})`, async () => {
    const rnd = seededRandom(SEED);
    const stalled: { destroy(): void }[] = [];
    try {
      for (let round = 0; round < ROUNDS; round++) {
        const kind = rnd();
        try {
          if (kind < 0.2) {
            const junk = new Uint8Array(Math.floor(rnd() * 3000));
            for (let i = 0; i < junk.length; i++) junk[i] = Math.floor(rnd() * 256);
            await throwAt(junk, rnd);
          } else if (kind < 0.6) {
            await throwAt(mutate(validStream(rnd), rnd), rnd);
          } else if (kind < 0.9) {
            const head = validStream(rnd);
            const tail = Array.from({ length: 1 + Math.floor(rnd() * 5) }, () =>
              randomRequest(rnd, rnd() < 0.5),
            );
            await throwAt(concat(head, ...tail), rnd);
          } else {
            // A stall: connect and say nothing (the handshake timeout drops it), or stop mid-request.
            const { socket: s, channel } = await rawConnect({ socket });
            s.on("error", () => undefined);
            if (rnd() < 0.5) channel.write(validStream(rnd).subarray(0, 60));
            stalled.push(s);
          }
        } catch (e) {
          throw new Error(`round ${round} (seed ${SEED}): ${String(e)}`, { cause: e });
        }
        if (round % 10 === 9) await healthy();
      }
      await healthy();
    } finally {
      for (const s of stalled) s.destroy();
    }
    await new Promise((r) => setTimeout(r, 200));
    await healthy();
    // Nothing reached the image that it refused as a bug: only request-level errors.
    for (const e of errors) expect(String(e)).not.toMatch(/TypeError|RangeError|ReferenceError/);
    await server.close();
    await image.close();
    if (hasQemu) {
      const r = qemuImg(["check", "-f", "qcow2", file]);
      expect(r.stdout + r.stderr, `seed ${SEED}`).toContain("No errors were found on the image.");
    }
  });
});
