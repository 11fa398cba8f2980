/**
 * QEMU iotest 271 ported (its check verdicts): extended L2 entries whose subcluster bitmaps
 * contradict each other or the entry, and unaligned data cluster offsets, with and without
 * allocated subclusters (the latter can be repaired). Images are made by qemu-img/qemu-io
 * and checked by qemu-img and by us on twins.
 */
import { join } from "node:path";
import { describe, it } from "vitest";
import { haveQemu } from "./helpers.js";
import {
  be64,
  expectSameGuest,
  expectSameReadOnly,
  expectSameRepair,
  peek,
  poke,
  qemuIo,
  run,
  scratch,
} from "./iotest-helpers.js";

// Not a multiple of the cluster (64 KiB) nor of the subcluster (2 KiB) size.
const SIZE = 1024 * 1024 - 1500;

/** An extended-L2 image, optionally over a raw backing file filled with 0xff. */
function make(dir: string, backing: boolean): string {
  const f = join(dir, "t.qcow2");
  const args = ["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"];
  if (backing) {
    const base = join(dir, "base.raw");
    run("qemu-img", ["create", "-q", "-f", "raw", base, String(128 * 1024)]);
    run("qemu-io", ["-f", "raw", "-c", "write -q -P 0xff 0 128k", base]);
    args.push("-F", "raw", "-b", base);
  }
  run("qemu-img", [...args, f, String(SIZE)]);
  return f;
}

/** File offset of the first L2 table. */
const l2Of = (f: string): number => peek(f, peek(f, 0x28, 8), 8) % 2 ** 56;

/**
 * Read-only, -r leaks and -r all verdicts on twins; then the same guest data on both repaired
 * twins, or (`guestAsBefore`) ours reads as the image did before the repair.
 */
async function allVerdicts(path: string, guestAsBefore = false): Promise<void> {
  await expectSameReadOnly(path);
  await expectSameRepair(path, "leaks");
  const { q, ours } = await expectSameRepair(path, "all");
  expectSameGuest(guestAsBefore ? path : q, ours);
}

describe("iotest 271: corrupted extended L2 entries", () => {
  const cases: Record<
    string,
    { prepare: string[]; damage: (f: string, l2: number) => void; guestAsBefore?: boolean }
  > = {
    "'cluster is zero' bit on an allocated standard entry (ignored)": {
      prepare: ["write -q -P 0x11 0 2k"],
      damage: (f, l2) => poke(f, l2 + 7, [1]),
    },
    "zero and allocated bits both set for a subcluster (allocated entry)": {
      prepare: ["write -q -P 3 32k 128k"],
      damage: (f, l2) => poke(f, l2 + 16 + 8, [0, 0, 0, 1]),
    },
    "'cluster is zero' bit on an unallocated entry (ignored)": {
      prepare: ["write -q 256k 1k"],
      damage: (f, l2) => poke(f, l2 + 7, [1]),
    },
    "allocated subcluster bit on an unallocated entry": {
      prepare: ["write -q 256k 1k"],
      damage: (f, l2) => poke(f, l2 + 15, [1]),
    },
    "zero and allocated bits both set (unallocated entry)": {
      prepare: ["write -q 256k 1k"],
      damage: (f, l2) => poke(f, l2 + 16 + 8, be64((1n << 32n) | 1n)),
    },
    "compressed cluster with a non-zero bitmap (ignored)": {
      prepare: ["write -q -P 11 -c 0 64k"],
      damage: (f, l2) => poke(f, l2 + 11, [1, 0x80]),
      // QEMU's leak repair frees the compressed cluster and punches a hole in it (its data
      // is gone: qemu-img can no longer read the image); ours frees it without discarding,
      // so qemu-img reads the image as before.
      guestAsBefore: true,
    },
  };
  for (const [name, { prepare, damage, guestAsBefore }] of Object.entries(cases)) {
    it(name, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      const f = make(scratch("271"), false);
      qemuIo(f, ...prepare);
      damage(f, l2Of(f));
      await allVerdicts(f, guestAsBefore);
    });
  }
});

describe("iotest 271: unaligned data cluster offsets", () => {
  it("with an allocated subcluster: qemu-img cannot repair it", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = make(scratch("271"), true);
    qemuIo(f, "write -q -P 1 4k 2k");
    poke(f, l2Of(f) + 6, [2]);
    await expectSameReadOnly(f);
    await expectSameRepair(f, "leaks");
  });

  it("with no allocated subcluster: repaired, the data reads as before", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = make(scratch("271"), true);
    qemuIo(f, "write -q -P 1 4k 2k", "write -q -z 4k 2k");
    poke(f, l2Of(f) + 6, [2]);
    await allVerdicts(f);
  });
});
