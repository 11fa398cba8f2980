/**
 * The qemu-io command language behind `qimg io -c CMD ...`: read, write, discard, flush, map,
 * aio_read, aio_write, aio_flush, abort, sigraise — with qemu-io's option letters, messages and
 * report lines. Failures print qemu-io's message on stdout ("read failed: ...", "Pattern
 * verification failed at offset N, M bytes") and make the run exit 1, but later commands still
 * run, as in qemu-io. A failed aio request is reported when it completes and, as in qemu-io,
 * leaves the exit status alone.
 */
import { StatusCursor } from "@qimg/io";
import type { CliContext } from "./context.js";
import type { DiskImage, WritableDiskImage } from "./drivers.js";
import { requestErrorText } from "./errors.js";
import { cvtstr, dumpBuffer, report } from "./util/qemu-io-format.js";
import { parseSize, SizeParseError } from "./util/size.js";

/** qemu's BDRV_REQUEST_MAX_BYTES: the longest single request. */
export const MAX_REQUEST = 2147483136;
/** qemu-io's pattern for writes without -P. */
export const DEFAULT_WRITE_PATTERN = 0xcd;

/** Thrown to stop at once (abort, sigraise) when the process cannot really be ended. */
export class ScriptCrash extends Error {
  constructor(readonly exitCode: number) {
    super(`crash (exit ${exitCode})`);
  }
}

/** A command line failed: its message was already printed. */
class CommandFailed extends Error {}

/**
 * A request refused before it reached the image, as QEMU's block layer and qemu-io refuse it;
 * the message is the strerror() text qemu-io prints.
 */
class RequestRefused extends Error {}

export interface ScriptTarget {
  readonly image: DiskImage;
  /** The write side (the image itself); undefined when opened read-only. */
  readonly writable: WritableDiskImage | undefined;
  readonly file: string;
  /** Flush after every write, zero write and discard (a write-through cache mode). */
  readonly flushEachWrite?: boolean | undefined;
}

/** Split a command line at blanks, honouring double and single quotes. */
export function tokenize(line: string): string[] {
  const out: string[] = [];
  const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
  for (let m = re.exec(line); m !== null; m = re.exec(line)) out.push(m[1] ?? m[2] ?? m[3] ?? "");
  return out;
}

interface Parsed {
  readonly flags: Map<string, string | true>;
  readonly args: string[];
}

/** getopt() with glibc's permutation: options may follow operands; `--` ends options. */
function getopt(cmd: string, argv: readonly string[], spec: string, ctx: CliContext): Parsed {
  const flags = new Map<string, string | true>();
  const args: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] ?? "";
    if (a === "--") {
      args.push(...argv.slice(i + 1));
      break;
    }
    if (!a.startsWith("-") || a === "-") {
      args.push(a);
      continue;
    }
    for (let j = 1; j < a.length; j++) {
      const c = a[j] ?? "";
      const at = spec.indexOf(c);
      if (at < 0 || c === ":") {
        ctx.stderr(`${cmd}: invalid option -- '${c}'\n`);
        throw new CommandFailed();
      }
      if (spec[at + 1] === ":") {
        let value = a.slice(j + 1);
        if (value === "") {
          i++;
          if (i >= argv.length) {
            ctx.stderr(`${cmd}: option requires an argument -- '${c}'\n`);
            throw new CommandFailed();
          }
          value = argv[i] ?? "";
        }
        flags.set(c, value);
        break;
      }
      flags.set(c, true);
    }
  }
  return { flags, args };
}

export class IoScript {
  /** Requests issued by aio_* and not yet awaited. */
  private readonly pending = new Set<Promise<void>>();
  /** Whether any command failed (the exit code is then 1). */
  failed = false;

  constructor(
    private readonly target: ScriptTarget,
    private readonly ctx: CliContext,
  ) {}

  private out(text: string): void {
    this.ctx.stdout(text);
  }

  private fail(message: string): never {
    this.out(message + "\n");
    throw new CommandFailed();
  }

  /** Run one command line. Throws {@link ScriptCrash} for abort/sigraise when in-process. */
  async run(line: string): Promise<void> {
    const argv = tokenize(line);
    const name = argv[0];
    if (name === undefined) return;
    try {
      await this.dispatch(name, argv.slice(1));
    } catch (e) {
      if (e instanceof CommandFailed) {
        this.failed = true;
        return;
      }
      throw e;
    }
  }

  /** Wait for every aio request (as qemu-io drains before it exits). */
  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  private argCount(cmd: string, args: readonly string[], min: number, max: number): void {
    if (args.length >= min && args.length <= max) return;
    const expected =
      min === max
        ? `expected ${min} argument${min === 1 ? "" : "s"}`
        : max === Infinity
          ? `expected at least ${min} argument${min === 1 ? "" : "s"}`
          : `expected between ${min} and ${max} arguments`;
    this.ctx.stderr(`bad argument count ${args.length} to ${cmd}, ${expected}\n`);
    throw new CommandFailed();
  }

  private num(text: string): number {
    try {
      return parseSize(text);
    } catch (e) {
      if (e instanceof SizeParseError && e.kind === "range")
        this.fail(`Parsing error: argument too large -- ${text}`);
      this.fail(
        `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`,
      );
    }
  }

  private pattern(text: string): number {
    const m = /^\s*([+-]?)(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)$/i.exec(text);
    let v = Number.NaN;
    if (m !== null) {
      const body = m[2] ?? "";
      v = /^0x/i.test(body)
        ? Number.parseInt(body.slice(2), 16)
        : body.startsWith("0")
          ? Number.parseInt(body, 8)
          : Number.parseInt(body, 10);
      if (m[1] === "-") v = -v;
    }
    if (!(v >= 0 && v <= 255)) this.fail(`${text} is not a valid pattern byte`);
    return v;
  }

  private offLen(args: readonly string[]): [number, number] {
    const offset = this.num(args[0] ?? "");
    const length = this.num(args[1] ?? "");
    if (length > MAX_REQUEST) {
      this.fail(`length cannot exceed ${MAX_REQUEST} without -n, given ${args[1] ?? ""}`);
    }
    return [offset, length];
  }

  private writable(): WritableDiskImage {
    const w = this.target.writable;
    if (w === undefined) {
      this.ctx.stderr(`qimg: ${this.target.file}: Block node is read-only\n`);
      throw new CommandFailed();
    }
    return w;
  }

  /** qemu-io's words for a failed request: by the error's code, else its message. */
  private errorText(e: unknown): string {
    return e instanceof RequestRefused ? e.message : requestErrorText(e);
  }

  /**
   * Run a request on [offset, offset + length) unless it passes the end of the image, which
   * fails with qemu-io's EIO before anything reaches the image (QEMU's block layer checks it
   * first); with a write-through cache mode a write is followed by a flush.
   */
  private request(
    offset: number,
    length: number,
    fn: () => Promise<void>,
    write = false,
  ): Promise<void> {
    if (offset + length > this.target.image.virtualSize) {
      return Promise.reject(new RequestRefused("Input/output error"));
    }
    const w = this.target.writable;
    if (write && w !== undefined && this.target.flushEachWrite === true) {
      return fn().then(() => w.flush());
    }
    return fn();
  }

  private async dispatch(name: string, argv: readonly string[]): Promise<void> {
    switch (name) {
      case "read":
      case "r":
        return this.read("read", argv, false);
      case "aio_read":
        return this.read("aio_read", argv, true);
      case "write":
      case "w":
        return this.write("write", argv, false);
      case "aio_write":
        return this.write("aio_write", argv, true);
      case "discard":
      case "d":
        return this.discard(argv);
      case "flush":
      case "f":
        this.argCount("flush", argv, 0, 0);
        return this.flush();
      case "aio_flush":
        this.argCount("aio_flush", argv, 0, 0);
        await this.drain();
        return this.flush();
      case "map":
        this.argCount("map", argv, 0, 0);
        return this.map();
      case "abort":
        this.argCount("abort", argv, 0, 0);
        return this.crash(134);
      case "sigraise": {
        this.argCount("sigraise", argv, 1, 1);
        const sig = Number(argv[0]);
        if (!Number.isInteger(sig) || sig < 0 || sig > 64) {
          this.fail(
            `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${argv[0] ?? ""}`,
          );
        }
        if (this.ctx.raiseSignal !== undefined) {
          this.ctx.raiseSignal(sig);
          // A fatal signal ends the process before we get here; give it a moment.
          await new Promise((r) => setTimeout(r, 50));
          return;
        }
        throw new ScriptCrash(128 + sig);
      }
      default:
        this.ctx.stderr(`command "${name}" not found\n`);
        throw new CommandFailed();
    }
  }

  private crash(code: number): never {
    if (this.ctx.exitNow !== undefined) this.ctx.exitNow(code);
    throw new ScriptCrash(code);
  }

  private async flush(): Promise<void> {
    if (this.target.writable === undefined) return;
    try {
      await this.target.writable.flush();
    } catch (e) {
      this.fail(`flush failed: ${this.errorText(e)}`);
    }
  }

  private async read(cmd: string, argv: readonly string[], aio: boolean): Promise<void> {
    const { flags, args } = getopt(cmd, argv, "P:vqCbl:s:", this.ctx);
    this.argCount(cmd, args, 2, 2);
    const pattern = flags.has("P") ? this.pattern(String(flags.get("P"))) : undefined;
    const [offset, length] = this.offLen(args);
    const quiet = flags.has("q");
    const verbose = flags.has("v");
    const buf = new Uint8Array(length);
    const t0 = performance.now();
    const finish = (): void => {
      const seconds = (performance.now() - t0) / 1000;
      let bad = false;
      if (pattern !== undefined) {
        for (let i = 0; i < length; i++) {
          if (buf[i] !== pattern) {
            bad = true;
            break;
          }
        }
        if (bad) this.out(`Pattern verification failed at offset ${offset}, ${length} bytes\n`);
      }
      if (verbose) this.out(dumpBuffer(buf, offset));
      if (!quiet) this.out(report("read", seconds, offset, length, length, 1));
      if (bad) throw new CommandFailed();
    };
    const op = this.request(offset, length, () => this.target.image.read(offset, buf));
    await this.complete(op, finish, aio, cmd, "read");
  }

  /** aio_* commands run in the background until aio_flush; the others complete here. */
  private async complete(
    op: Promise<void>,
    finish: () => void,
    aio: boolean,
    cmd: string,
    what: "read" | "write",
  ): Promise<void> {
    if (aio) {
      this.track(op.then(finish), cmd);
      return;
    }
    try {
      await op;
    } catch (e) {
      this.fail(`${what} failed: ${this.errorText(e)}`);
    }
    finish();
  }

  private async write(cmd: string, argv: readonly string[], aio: boolean): Promise<void> {
    const { flags, args } = getopt(cmd, argv, aio ? "P:zuqfiC" : "P:zucqfnbCs:", this.ctx);
    this.argCount(cmd, args, 2, 2);
    const zero = flags.has("z");
    const compressed = flags.has("c");
    if (zero && flags.has("P"))
      this.fail("Only one of -z, -P, and -s can be specified at the same time");
    if (flags.has("u") && !zero) this.fail("-u requires -z to be specified");
    if (zero && compressed) this.fail("-c and -z cannot be specified at the same time");
    const pattern = flags.has("P") ? this.pattern(String(flags.get("P"))) : DEFAULT_WRITE_PATTERN;
    const [offset, length] = this.offLen(args);
    if (compressed) {
      // qemu-io's own check for compressed requests, before anything reaches the image.
      if (offset % 512 !== 0) this.fail(`${args[0]} is not a sector-aligned value for 'offset'`);
      if (length % 512 !== 0) this.fail(`${args[1]} is not a sector-aligned value for 'count'`);
    }
    const w = this.writable();
    const quiet = flags.has("q");
    const t0 = performance.now();
    let op: Promise<void>;
    if (zero) {
      const mayUnmap = flags.has("u");
      op = this.request(offset, length, () => w.writeZeroes(offset, length, { mayUnmap }), true);
    } else {
      const data = new Uint8Array(length).fill(pattern);
      op = compressed
        ? this.writeCompressed(w, offset, data)
        : this.request(offset, length, () => w.write(offset, data), true);
    }
    const finish = (): void => {
      if (!quiet)
        this.out(report("wrote", (performance.now() - t0) / 1000, offset, length, length, 1));
    };
    await this.complete(op, finish, aio, cmd, "write");
  }

  /**
   * write -c: one compressed write per whole cluster (the last one may end at the disk end).
   * A request within the disk that does not cover whole clusters goes to the driver as it is:
   * as in QEMU, the driver marks it dirty in persistent bitmaps, then refuses it (EINVAL).
   */
  private async writeCompressed(
    w: WritableDiskImage,
    offset: number,
    data: Uint8Array,
  ): Promise<void> {
    const cs = w.clusterSize;
    const size = this.target.image.virtualSize;
    const end = offset + data.length;
    // Formats without compressed clusters (QED, raw): qemu-io's ENOTSUP.
    if (!("writeCompressed" in w) || w.writeCompressed === undefined) {
      throw new RequestRefused("Operation not supported");
    }
    if (data.length === 0) return; // qemu-io: "wrote 0/0 bytes"
    if (end > size) throw new RequestRefused("Input/output error");
    if (offset % cs !== 0 || (end % cs !== 0 && end !== size)) {
      await w.writeCompressed(offset, data);
      // (A driver that took it anyway wrote it: nothing to refuse.)
      return;
    }
    const jobs: Promise<void>[] = [];
    for (let pos = 0; pos < data.length; pos += cs) {
      jobs.push(
        w.writeCompressed(offset + pos, data.subarray(pos, Math.min(pos + cs, data.length))),
      );
    }
    await Promise.all(jobs);
  }

  private async discard(argv: readonly string[]): Promise<void> {
    const { flags, args } = getopt("discard", argv, "Cq", this.ctx);
    this.argCount("discard", args, 2, 2);
    const [offset, length] = this.offLen(args);
    const w = this.writable();
    const t0 = performance.now();
    try {
      await this.request(offset, length, () => w.discard(offset, length), true);
    } catch (e) {
      this.fail(`discard failed: ${this.errorText(e)}`);
    }
    if (!flags.has("q"))
      this.out(report("discard", (performance.now() - t0) / 1000, offset, length, length, 1));
  }

  /** qemu-io's map: runs allocated in this layer (data or zero flag) vs not, merged. */
  private async map(): Promise<void> {
    const image = this.target.image;
    const size = image.virtualSize;
    let offset = 0;
    // One driver call per extent: the status that ends a run starts the next one.
    const cursor = new StatusCursor(image);
    try {
      do {
        let allocated: boolean | undefined;
        let n = 0;
        while (offset + n < size) {
          const s = await cursor.at(offset + n);
          const a = s.present && s.depth === 0;
          if (allocated === undefined) allocated = a;
          else if (a !== allocated) break;
          n = cursor.end - offset;
        }
        const state = allocated === true ? "    allocated" : "not allocated";
        this.out(
          `${cvtstr(n)} (0x${n.toString(16)}) bytes ${state} at offset ${cvtstr(offset)} (0x${offset.toString(16)})\n`,
        );
        offset += n;
      } while (offset < size);
    } catch (e) {
      this.fail(`map failed: ${this.errorText(e)}`);
    }
  }

  /**
   * An aio request's failure (or pattern mismatch) is reported when it completes but, as in
   * qemu-io, does not change the exit status: only synchronous commands' failures count.
   */
  private track(op: Promise<void>, cmd: string): void {
    const p: Promise<void> = op
      .catch((e: unknown) => {
        if (e instanceof CommandFailed) return;
        // qemu-io's words: "readv failed" for aio_read, "aio_write failed" for aio_write.
        this.out(`${cmd === "aio_read" ? "readv" : cmd} failed: ${this.errorText(e)}\n`);
      })
      .finally(() => this.pending.delete(p));
    this.pending.add(p);
  }
}
