/**
 * The qemu-io command language behind `qimg io -c CMD ...`: read, readv, write, writev,
 * discard, flush, map, alloc, length, info, help, aio_read, aio_write, aio_flush, abort,
 * sigraise, close, open, reopen, truncate, quit, sleep — with qemu-io's option letters, messages, report lines and argument checks (the
 * word count first, against the command table; then the read-only refusal; then the options,
 * where a bad option or operand count prints the command's usage line). Failures print qemu-io's message on stdout ("read failed: ...", "Pattern
 * verification failed at offset N, M bytes") and make the run exit 1, but later commands still
 * run, as in qemu-io. A failed aio request is reported when it completes and, as in qemu-io,
 * leaves the exit status alone.
 */
import { closeSync, openSync, readSync } from "node:fs";
import { StatusCursor } from "@qimg/io";
import type { CliContext } from "./context.js";
import type { DiskImage, WritableDiskImage } from "./drivers.js";
import { FileContextError, messageOf, requestErrorText } from "./errors.js";
import { imageInfoJson } from "./commands/info.js";
import { qcow2InfoOf, qedInfoOf } from "./drivers.js";
import { dumpQObject, type QJson } from "./util/qjson.js";
import { cvtstr, dumpBuffer, helpLine, report } from "./util/qemu-io-format.js";
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

/** aio_read/aio_write -i: the command ends at once, successfully, after saying so. */
class Injected extends Error {
  constructor(readonly kind: "read" | "write") {
    super(`injecting invalid ${kind} request`);
  }
}

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

/** How `open` and `reopen` open an image (the io command's own open, with its options). */
export interface ScriptOpenOptions {
  readonly readOnly: boolean;
  /** qemu-io -U: share every lock (read-only opens only). */
  readonly forceShare?: boolean;
  /** A cache mode (-t), or undefined for the io command's default. */
  readonly cache?: string | undefined;
  /** -o driver=FMT: the format, else probed. */
  readonly format?: string | undefined;
}

/** Opens `file` for `open`/`reopen`; throws the error qemu-io would report. */
export type ScriptOpener = (file: string, options: ScriptOpenOptions) => Promise<ScriptTarget>;

/**
 * Split a command line into words as qemu-io does: at spaces only (a run of them is one
 * break); quotes and tabs are characters like any other.
 */
export function tokenize(line: string): string[] {
  return line.split(" ").filter((w) => w !== "");
}

interface Parsed {
  readonly flags: Map<string, string | true>;
  readonly args: string[];
}

/** One command of the table: its names, synopsis, description and word-count limits. */
export interface IoCommandSpec {
  readonly name: string;
  /** The short name (qemu-io's altname), e.g. "r" for read. */
  readonly alt?: string;
  /** The synopsis of its options and operands, as `help` and the usage line show it. */
  readonly args: string;
  readonly text: string;
  /** Fewest and most words after the command name (options included). */
  readonly min: number;
  readonly max: number;
  /** It changes the image: refused on a read-only open (after the word count is checked). */
  readonly writes?: boolean;
  /** What `help NAME` prints after the usage line (in qemu-io's layout; our own words). */
  readonly long?: LongHelp;
}

/** A command's extended help: a summary, one example, a paragraph and its options. */
export interface LongHelp {
  readonly summary: string;
  /** The example command line and what it does. */
  readonly example: readonly [string, string];
  readonly body: string;
  /** Option letter and what it does, in the order listed. */
  readonly options: readonly (readonly [string, string])[];
}

const STATS = ["C", "print the statistics as one comma-separated line"] as const;
const QUIET = ["q", "print no statistics"] as const;

/** `help NAME`'s text after the usage line (qemu-io's layout). */
function longHelpText(h: LongHelp): string {
  const opts = h.options.map(([c, text]) => ` -${c}, -- ${text}\n`).join("");
  return `\n ${h.summary}\n\n Example:\n '${h.example[0]}' - ${h.example[1]}\n\n ${h.body}\n${opts}\n`;
}

/** The commands, in the order `help` lists them. */
export const IO_COMMANDS: readonly IoCommandSpec[] = [
  { name: "abort", args: "", text: "end the process at once, as a crash would", min: 0, max: 0 },
  { name: "aio_flush", args: "", text: "wait for every aio request, then flush", min: 0, max: 0 },
  {
    name: "aio_read",
    args: "[-Ciqv] [-P pattern] off len [len..]",
    text: "start a read in the background",
    min: 2,
    max: Infinity,
    long: {
      summary: "starts reading a range of the disk and returns at once",
      example: ["aio_read -v 0 4k 4k", "reads 8 KiB from offset 0 into two buffers and dumps them"],
      body: "The read runs in the background; aio_flush (or the end of the script) waits for it.",
      options: [
        STATS,
        ["P", "check that every byte read equals the pattern"],
        ["i", "count an invalid request instead (nothing reaches the image)"],
        ["v", "dump the bytes read"],
        QUIET,
      ],
    },
  },
  {
    name: "aio_write",
    args: "[-Cfiquz] [-P pattern] off len [len..]",
    text: "start a write in the background",
    min: 2,
    max: Infinity,
    writes: true,
    long: {
      summary: "starts writing a range of the disk and returns at once",
      example: ["aio_write -P 0x5a 1k 512", "writes 512 bytes of 0x5a at offset 1 KiB"],
      body: "The write runs in the background; aio_flush (or the end of the script) waits for it.",
      options: [
        ["P", "the byte to fill the buffer with (default 0xcd)"],
        STATS,
        ["f", "make the write durable before it completes (FUA)"],
        ["i", "count an invalid request instead (nothing reaches the image)"],
        QUIET,
        ["u", "with -z: let the format release the clusters"],
        ["z", "write zeros without a buffer"],
      ],
    },
  },
  {
    name: "alloc",
    args: "offset [count]",
    text: "count the bytes from offset that this image allocates",
    min: 1,
    max: 2,
  },
  { name: "close", alt: "c", args: "", text: "close the image", min: 0, max: 0 },
  {
    name: "discard",
    alt: "d",
    args: "[-Cq] off len",
    text: "discard a range of the disk",
    min: 2,
    max: Infinity,
    writes: true,
    long: {
      summary: "tells the image that a range of the disk is no longer needed",
      example: ["discard 64k 128k", "discards 128 KiB starting at 64 KiB"],
      body: "The range may read as zeros (or as older data) afterwards.",
      options: [STATS, QUIET],
    },
  },
  { name: "flush", alt: "f", args: "", text: "flush the image to stable storage", min: 0, max: 0 },
  {
    name: "help",
    alt: "?",
    args: "[command]",
    text: "list the commands, or explain one",
    min: 0,
    max: 1,
  },
  { name: "info", args: "", text: "show the image's format facts", min: 0, max: 0 },
  { name: "length", args: "", text: "show the disk size", min: 0, max: 0 },
  {
    name: "map",
    args: "",
    text: "list the allocated and unallocated runs of the disk",
    min: 0,
    max: 0,
  },
  {
    name: "open",
    alt: "o",
    args: "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
    text: "open an image (after close)",
    min: 1,
    max: Infinity,
    long: {
      summary: "opens an image after close",
      example: ["open -r -o driver=qcow2 disk.qcow2", "opens disk.qcow2 read-only as qcow2"],
      body: "Every other command works on the image opened here (qimg io takes -r, -U, -t, -n, -o driver=).",
      options: [
        ["r", "open read-only"],
        ["s", "write to a temporary overlay (not supported by qimg io)"],
        ["C", "copy what is read from the backing file (not supported by qimg io)"],
        ["n", "same as -t none"],
        ["U", "share the image with writers (needs -r)"],
        ["k", "use native AIO (not supported by qimg io)"],
        ["i", "choose the AIO engine (not supported by qimg io)"],
        ["t", "the cache mode"],
        ["d", "the discard mode (not supported by qimg io)"],
        ["o", "open options; qimg io takes driver=FORMAT"],
      ],
    },
  },
  { name: "quit", alt: "q", args: "", text: "stop: skip the commands that follow", min: 0, max: 0 },
  {
    name: "read",
    alt: "r",
    args: "[-bCqv] [-P pattern [-s off] [-l len]] off len",
    text: "read a range of the disk",
    min: 2,
    max: Infinity,
    long: {
      summary: "reads a range of the disk",
      example: ["read -P 0xab 0 4k", "reads 4 KiB at offset 0 and checks that every byte is 0xab"],
      body: "Prints how many bytes were read and how fast, unless -q; -v dumps them.",
      options: [
        ["b", "read the saved VM state instead of the disk"],
        STATS,
        ["l", "with -P: how many bytes to check"],
        ["p", "accepted and ignored"],
        ["P", "check the bytes read against this pattern byte"],
        QUIET,
        ["s", "with -P: where in the buffer the check starts"],
        ["v", "dump the bytes read"],
      ],
    },
  },
  {
    name: "readv",
    args: "[-Cqv] [-P pattern] off len [len..]",
    text: "read a range of the disk into several buffers",
    min: 2,
    max: Infinity,
    long: {
      summary: "reads a range of the disk into several buffers",
      example: [
        "readv 0 512 1k",
        "reads 1536 bytes from offset 0 into a 512-byte and a 1 KiB buffer",
      ],
      body: "One request whose length is the sum of the buffer lengths.",
      options: [
        STATS,
        ["P", "check the bytes read against this pattern byte"],
        ["v", "dump the bytes read"],
        QUIET,
      ],
    },
  },
  {
    name: "reopen",
    args: "[(-r|-w)] [-c cache] [-o options]",
    text: "open the image again, read-only (-r) or read-write (-w)",
    min: 0,
    max: Infinity,
    long: {
      summary: "opens the image again with other options",
      example: ["reopen -r", "makes the image read-only until the next reopen -w"],
      body: "qimg io closes the image cleanly and opens it again.",
      options: [
        ["r", "read-only"],
        ["w", "read-write"],
        ["c", "the cache mode"],
        ["o", "other options (refused: none can change)"],
      ],
    },
  },
  {
    name: "sigraise",
    args: "signal",
    text: "send the process a signal",
    min: 1,
    max: 1,
    long: {
      summary: "sends this process a signal",
      example: ["sigraise 9", "kills the process as a crash would"],
      body: "The signal is a number; the image is left as the signal leaves it.",
      options: [],
    },
  },
  { name: "sleep", args: "milliseconds", text: "wait, doing nothing", min: 1, max: 1 },
  {
    name: "truncate",
    args: "[-m prealloc_mode] off",
    text: "change the disk size (grow or shrink)",
    min: 1,
    max: 3,
    writes: true,
  },
  {
    name: "write",
    alt: "w",
    args: "[-bcCfnquz] [-P pattern | -s source_file] off len",
    text: "write a range of the disk",
    min: 2,
    max: Infinity,
    writes: true,
    long: {
      summary: "writes a range of the disk",
      example: ["write -P 0x5a 1k 512", "writes 512 bytes of 0x5a at offset 1 KiB"],
      body: "The buffer holds the pattern byte (default 0xcd) or the bytes of a file (-s).",
      options: [
        ["b", "write the saved VM state instead of the disk"],
        ["c", "write one whole cluster compressed"],
        ["f", "make the write durable before it completes (FUA)"],
        ["n", "with -z: no length limit"],
        ["p", "accepted and ignored"],
        ["P", "the byte to fill the buffer with"],
        ["s", "take the bytes from this file (repeated as needed)"],
        STATS,
        QUIET,
        ["u", "with -z: let the format release the clusters"],
        ["z", "write zeros without a buffer"],
      ],
    },
  },
  {
    name: "writev",
    args: "[-Cfq] [-P pattern] off len [len..]",
    text: "write a range of the disk from several buffers",
    min: 2,
    max: Infinity,
    writes: true,
    long: {
      summary: "writes a range of the disk from several buffers",
      example: [
        "writev -P 7 0 512 1k",
        "writes 1536 bytes of 7 from a 512-byte and a 1 KiB buffer",
      ],
      body: "One request whose length is the sum of the buffer lengths.",
      options: [
        ["P", "the byte to fill the buffers with"],
        STATS,
        ["f", "make the write durable before it completes (FUA)"],
        QUIET,
      ],
    },
  },
];

/** Commands that run with no image open (qemu-io's CMD_NOFILE_OK). */
const NO_FILE_OK = new Set(["help", "open", "quit", "sleep", "sigraise", "abort"]);

const BY_NAME = new Map<string, IoCommandSpec>();
for (const c of IO_COMMANDS) {
  BY_NAME.set(c.name, c);
  if (c.alt !== undefined) BY_NAME.set(c.alt, c);
}

export class IoScript {
  /** Requests issued by aio_* and not yet awaited. */
  private readonly pending = new Set<Promise<void>>();
  /** Whether any command failed (the exit code is then 1). */
  failed = false;
  /** Set by `quit`: the commands after it are skipped. */
  quit = false;
  /** The command's name as typed ("r" for read): getopt's messages use it. */
  private typed = "";

  /** After `close` (and before a new `open`): no image. */
  private closed = false;

  constructor(
    private target: ScriptTarget,
    private readonly ctx: CliContext,
    private readonly opener?: ScriptOpener,
  ) {}

  /** Close the open image, if any (at the end of the script; aio requests first). */
  async close(): Promise<void> {
    await this.drain();
    if (this.closed) return;
    this.closed = true;
    await this.target.image.close();
  }

  private out(text: string): void {
    this.ctx.stdout(text);
  }

  private fail(message: string): never {
    this.out(message + "\n");
    throw new CommandFailed();
  }

  /** Run one command line. Throws {@link ScriptCrash} for abort/sigraise when in-process. */
  async run(line: string): Promise<void> {
    if (this.quit) return;
    const argv = tokenize(line);
    const name = argv[0];
    if (name === undefined) return;
    try {
      const spec = BY_NAME.get(name);
      if (spec === undefined) {
        this.ctx.stderr(`command "${name}" not found\n`);
        throw new CommandFailed();
      }
      const words = argv.slice(1);
      this.wordCount(name, words.length, spec.min, spec.max);
      if (this.closed && !NO_FILE_OK.has(spec.name)) {
        this.ctx.stderr("no file open, try 'help open'\n");
        throw new CommandFailed();
      }
      if (spec.writes === true && this.target.writable === undefined) {
        this.ctx.stderr("qimg: Block node is read-only\n");
        throw new CommandFailed();
      }
      this.typed = name;
      await this.dispatch(spec, words);
    } catch (e) {
      if (e instanceof CommandFailed) {
        this.failed = true;
        return;
      }
      if (e instanceof Injected) {
        this.out(`injecting invalid ${e.kind} request\n`);
        return;
      }
      throw e;
    }
  }

  /** Wait for every aio request (as qemu-io drains before it exits). */
  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  /** The table's check of the words after the command name (options included). */
  private wordCount(cmd: string, n: number, min: number, max: number): void {
    if (n >= min && n <= max) return;
    const expected =
      min === max
        ? `expected ${min} arguments`
        : max === Infinity
          ? `expected at least ${min} arguments`
          : `expected between ${min} and ${max} arguments`;
    this.ctx.stderr(`bad argument count ${n} to ${cmd}, ${expected}\n`);
    throw new CommandFailed();
  }

  /** The command's usage line (stdout), then fail. */
  private usage(spec: IoCommandSpec): never {
    this.out(helpLine(spec.name, spec.args, spec.text));
    throw new CommandFailed();
  }

  /**
   * getopt() with glibc's permutation: options may follow operands; `--` ends options. A bad
   * option is named on stderr, then the usage line follows; so does an operand count outside
   * [min, max]. A bad -P pattern is reported as the option is read.
   */
  private getopt(
    spec: IoCommandSpec,
    argv: readonly string[],
    letters: string,
    min: number,
    max: number,
  ): Parsed {
    const cmd = spec.name;
    const typed = this.typed;
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
        const at = letters.indexOf(c);
        if (at < 0 || c === ":") {
          this.ctx.stderr(`${typed}: invalid option -- '${c}'\n`);
          this.usage(spec);
        }
        if (letters[at + 1] === ":") {
          let value = a.slice(j + 1);
          if (value === "") {
            i++;
            if (i >= argv.length) {
              this.ctx.stderr(`${typed}: option requires an argument -- '${c}'\n`);
              this.usage(spec);
            }
            value = argv[i] ?? "";
          }
          if (c === "P") this.pattern(value);
          // read's -s and -l (the verified part of the buffer) are numbers, read as given.
          if (cmd === "read" && (c === "s" || c === "l")) this.num(value);
          flags.set(c, value);
          break;
        }
        // aio_* -i: an invalid request for the statistics; nothing reaches the image.
        if (c === "i") throw new Injected(cmd === "aio_read" ? "read" : "write");
        flags.set(c, true);
      }
    }
    if (args.length < min || args.length > max) this.usage(spec);
    return { flags, args };
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

  /**
   * The offset and length of read, write and discard. A length past one request's limit is
   * refused; write's words name -n, which (with -z) lifts the limit.
   */
  private offLen(args: readonly string[], write?: { noLimit: boolean }): [number, number] {
    const offset = this.num(args[0] ?? "");
    const length = this.num(args[1] ?? "");
    if (length > MAX_REQUEST && write?.noLimit !== true) {
      const n = write === undefined ? "" : " without -n";
      this.fail(`length cannot exceed ${MAX_REQUEST}${n}, given ${args[1] ?? ""}`);
    }
    return [offset, length];
  }

  /**
   * An offset and a list of lengths (readv, writev, aio_*): each length and their sum must
   * stay within one request's limit. Returns the offset and the sum.
   */
  private offLengths(args: readonly string[]): [number, number] {
    const offset = this.num(args[0] ?? "");
    let total = 0;
    for (const text of args.slice(1)) {
      const len = this.num(text);
      if (len > MAX_REQUEST) this.fail(`Argument '${text}' exceeds maximum size ${MAX_REQUEST}`);
      if (total > MAX_REQUEST - len)
        this.fail(`The total number of bytes exceed the maximum size ${MAX_REQUEST}`);
      total += len;
    }
    return [offset, total];
  }

  private writable(): WritableDiskImage {
    const w = this.target.writable;
    if (w === undefined) {
      this.ctx.stderr("qimg: Block node is read-only\n");
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

  private async dispatch(spec: IoCommandSpec, argv: readonly string[]): Promise<void> {
    switch (spec.name) {
      case "read":
      case "readv":
        return this.read(spec, argv, false);
      case "aio_read":
        return this.read(spec, argv, true);
      case "write":
      case "writev":
        return this.write(spec, argv, false);
      case "aio_write":
        return this.write(spec, argv, true);
      case "discard":
        return this.discard(spec, argv);
      case "flush":
        return this.flush();
      case "aio_flush":
        await this.drain();
        return this.flush();
      case "map":
        if (this.gone()) {
          this.ctx.stderr("qimg: Failed to query image length: No medium found\n");
          throw new CommandFailed();
        }
        return this.map();
      case "alloc":
        return this.alloc(argv);
      case "length":
        if (this.gone()) this.fail("getlength: No medium found");
        this.out(`${cvtstr(this.target.image.virtualSize)}\n`);
        return;
      case "info":
        return this.info();
      case "help":
        return this.help(argv[0]);
      case "close":
        return this.close();
      case "open":
        return this.open(spec, argv);
      case "reopen":
        return this.reopen(spec, argv);
      case "truncate":
        return this.truncate(spec, argv);
      case "quit":
        this.quit = true;
        return;
      case "sleep": {
        // A C integer (decimal, 0x hex, 0 octal); no size suffixes.
        const text = argv[0] ?? "";
        const m = /^\s*\+?(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)$/i.exec(text);
        if (m === null) this.fail(`${text} is not a valid number`);
        const body = m[1] ?? "0";
        const ms = /^0x/i.test(body)
          ? Number.parseInt(body.slice(2), 16)
          : Number.parseInt(body, body.startsWith("0") ? 8 : 10);
        await new Promise((r) => setTimeout(r, ms));
        return;
      }
      case "abort":
        return this.crash(134);
      case "sigraise": {
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
    }
  }

  /** Open through the io command's opener; qemu-io's line when it fails. */
  private async openWith(file: string, options: ScriptOpenOptions): Promise<void> {
    if (this.opener === undefined) this.fail("open is not available here");
    try {
      this.target = await this.opener(file, options);
      this.closed = false;
    } catch (e) {
      // A file that cannot be opened at all: qemu's "Could not open '<file>': <why>".
      const inner = e instanceof FileContextError ? e.error : e;
      const missing = inner instanceof Error && inner.message.includes(": open failed: ");
      const why = messageOf(e, file);
      const text = missing ? `Could not open '${file}': ${why}` : why;
      this.ctx.stderr(`qimg: can't open device ${file}: ${text}\n`);
      throw new CommandFailed();
    }
  }

  /**
   * open [-rU] [-t cache] [-n] [-o driver=FMT] path: open an image after `close`. (-s, -C,
   * -k and -d, and other -o options, are qemu-io's and refused here.)
   */
  private async open(spec: IoCommandSpec, argv: readonly string[]): Promise<void> {
    const { flags, args } = this.getopt(spec, argv, "rsCnkUt:d:o:", 0, 1);
    if (!this.closed) {
      this.ctx.stderr("qimg: file open already, try 'help close'\n");
      throw new CommandFailed();
    }
    for (const c of ["s", "C", "k", "d"]) {
      if (flags.has(c)) this.fail(`open: option -${c} is not supported by qimg io`);
    }
    let format: string | undefined;
    const o = flags.get("o");
    if (typeof o === "string") {
      for (const part of o.split(",")) {
        const [key, value] = part.split("=", 2);
        if (key === "driver" && value !== undefined) format = value;
        else this.fail(`open: option '${part}' is not supported by qimg io`);
      }
    }
    const file = args[0];
    if (file === undefined) {
      this.ctx.stderr("qimg: can't open: Must specify either driver or file\n");
      throw new CommandFailed();
    }
    const cache = flags.has("n") ? "none" : (flags.get("t") as string | undefined);
    await this.openWith(file, {
      readOnly: flags.has("r"),
      forceShare: flags.has("U"),
      cache,
      format,
    });
  }

  /** reopen [-r|-w] [-c cache]: the same image opened again, read-only or read-write. */
  private async reopen(spec: IoCommandSpec, argv: readonly string[]): Promise<void> {
    const { flags } = this.getopt(spec, argv, "c:o:rw", 0, 0);
    if (flags.has("r") && flags.has("w")) {
      this.ctx.stderr("qimg: Only one -r/-w option may be given\n");
      throw new CommandFailed();
    }
    if (flags.has("o")) {
      this.ctx.stderr(`qimg: Cannot change the option '${String(flags.get("o")).split("=")[0]}'\n`);
      throw new CommandFailed();
    }
    const readOnly = flags.has("r")
      ? true
      : flags.has("w")
        ? false
        : this.target.writable === undefined;
    const cache = flags.get("c") as string | undefined;
    if (!flags.has("r") && !flags.has("w") && cache === undefined) return;
    const file = this.target.file;
    await this.close();
    await this.openWith(file, { readOnly, cache });
  }

  /** truncate [-m prealloc] off: the new virtual size (qcow2 may shrink, as qemu-io's). */
  private async truncate(spec: IoCommandSpec, argv: readonly string[]): Promise<void> {
    const { flags, args } = this.getopt(spec, argv, "m:", 1, Infinity);
    const mode = (flags.get("m") as string | undefined) ?? "off";
    if (!["off", "metadata", "falloc", "full"].includes(mode)) {
      this.ctx.stderr(`qimg: Invalid preallocation mode '${mode}'\n`);
      throw new CommandFailed();
    }
    const size = this.num(args[0] ?? "");
    const w = this.writable();
    const image = w as WritableDiskImage & {
      resizeWith?: (n: number, o: { shrink: boolean; preallocation: string }) => Promise<void>;
    };
    try {
      // QED has no preallocation at all; the others refuse it for a shrink.
      if (mode !== "off" && w.format === "qed") {
        throw new Error(`Unsupported preallocation mode '${mode}'`);
      }
      if (mode !== "off" && size < w.virtualSize) {
        throw new Error(
          w.format === "raw"
            ? "Cannot use preallocation for shrinking files"
            : "Preallocation can't be used for shrinking an image",
        );
      }
      if (image.resizeWith !== undefined) {
        await image.resizeWith(size, { shrink: true, preallocation: mode });
      } else {
        // (A raw file grows sparse whatever the mode: the guest reads the same zeros.)
        await w.resize(size);
      }
    } catch (e) {
      this.ctx.stderr(`qimg: ${messageOf(e, this.target.file)}\n`);
      throw new CommandFailed();
    }
  }

  /** help: every command on one line each, or one command's line. */
  private help(name: string | undefined): void {
    if (name === undefined) {
      for (const c of IO_COMMANDS) this.out(helpLine(c.name, c.args, c.text));
      this.out("\nUse 'help commandname' for extended help.\n");
      return;
    }
    const spec = BY_NAME.get(name);
    if (spec === undefined) this.fail(`command ${name} not found`);
    this.out(helpLine(name, spec.args, spec.text));
    if (spec.long !== undefined) this.out(longHelpText(spec.long));
  }

  /**
   * alloc OFFSET [COUNT]: how many of COUNT bytes (default 512) from OFFSET this layer
   * allocates (data or zero flag, as map counts them); a range past the end of the disk is
   * cut at the end.
   */
  private async alloc(argv: readonly string[]): Promise<void> {
    const start = this.num(argv[0] ?? "");
    let count = argv.length > 1 ? this.num(argv[1] ?? "") : 512;
    const image = this.target.image;
    const end = Math.min(start + count, Math.max(image.virtualSize, start));
    count = end - start;
    let allocated = 0;
    const cursor = new StatusCursor(image);
    try {
      for (let pos = start; pos < end;) {
        const s = await cursor.at(pos);
        const next = Math.min(cursor.end, end);
        if (s.present && s.depth === 0) allocated += next - pos;
        pos = next;
      }
    } catch (e) {
      this.fail(`is_allocated failed: ${this.errorText(e)}`);
    }
    this.out(`${allocated}/${count} bytes allocated at offset ${cvtstr(start)}\n`);
  }

  /**
   * Whether this open marked the qcow2 image corrupt (a read-write open of an image already
   * marked corrupt is refused, so the bit on a writable image was set here). QEMU then drops
   * the image's driver: requests fail with "No medium found", `length` and `map` fail, and
   * `info` fails without a word.
   */
  private gone(): boolean {
    return this.target.writable !== undefined && qcow2InfoOf(this.target.image)?.corrupt === true;
  }

  /** info: the format, cluster size, VM state offset and the format-specific facts. */
  private info(): void {
    if (this.gone()) throw new CommandFailed();
    const image = this.target.image;
    const q = qcow2InfoOf(image);
    let clusterSize = 0;
    let vmState = 0;
    if (q !== undefined) {
      clusterSize = q.clusterSize;
      // The VM state lives past the guest disk, at the first L1 entry the disk does not use.
      const perL2 = (clusterSize / (q.extendedL2 ? 16 : 8)) * clusterSize;
      vmState = Math.ceil(image.virtualSize / perL2) * perL2;
    } else {
      clusterSize = qedInfoOf(image)?.clusterSize ?? 0;
    }
    this.out(`format name: ${image.format}\n`);
    this.out(`cluster size: ${cvtstr(clusterSize)}\n`);
    this.out(`vm state offset: ${cvtstr(vmState)}\n`);
    const spec = imageInfoJson(image, this.target.file)["format-specific"] as
      { data?: QJson } | undefined;
    if (spec !== undefined) {
      this.out("Format specific information:\n");
      this.out(dumpQObject(spec.data ?? null, 1));
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

  /** read, readv (several lengths: one request of their sum) and aio_read. */
  private async read(spec: IoCommandSpec, argv: readonly string[], aio: boolean): Promise<void> {
    const cmd = spec.name;
    const vector = cmd !== "read";
    const { flags, args } = vector
      ? this.getopt(spec, argv, aio ? "CP:iqv" : "CP:qv", 2, Infinity)
      : this.getopt(spec, argv, "P:vqCbpl:s:", 2, 2);
    const pattern = flags.has("P") ? this.pattern(String(flags.get("P"))) : undefined;
    const [offset, length] = vector ? this.offLengths(args) : this.offLen(args);
    // read -s OFF / -l LEN: verify the pattern on that part of the buffer only (with -P).
    const from = flags.has("s") ? this.num(String(flags.get("s"))) : 0;
    if (pattern === undefined && (flags.has("s") || flags.has("l"))) this.usage(spec);
    const span = flags.has("l") ? this.num(String(flags.get("l"))) : length - from;
    if (span < 0 || span + from > length)
      this.fail("pattern verification range exceeds end of read data");
    const quiet = flags.has("q");
    const verbose = flags.has("v");
    const buf = new Uint8Array(length);
    const t0 = performance.now();
    const finish = (): void => {
      const seconds = (performance.now() - t0) / 1000;
      let bad = false;
      if (pattern !== undefined) {
        for (let i = from; i < from + span; i++) {
          if (buf[i] !== pattern) {
            bad = true;
            break;
          }
        }
        if (bad)
          this.out(`Pattern verification failed at offset ${offset + from}, ${span} bytes\n`);
      }
      if (verbose) this.out(dumpBuffer(buf, offset));
      if (!quiet) this.out(report("read", seconds, offset, length, length, 1, flags.has("C")));
      if (bad) throw new CommandFailed();
    };
    // read -b: the VM state area, which qimg does not serve (qemu-io: ENOTSUP for QED and
    // raw; it reads a qcow2 image's VM state). Refused before anything reaches the image.
    const vmstate = cmd === "read" && flags.has("b");
    if (vmstate) this.sectorAligned(offset, length);
    const op = vmstate
      ? Promise.reject(new RequestRefused("Operation not supported"))
      : this.request(offset, length, () => this.target.image.read(offset, buf));
    await this.complete(op, finish, aio, cmd, cmd === "readv" ? "readv" : "read");
  }

  /** aio_* commands run in the background until aio_flush; the others complete here. */
  private async complete(
    op: Promise<void>,
    finish: () => void,
    aio: boolean,
    cmd: string,
    what: string,
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

  /** write, writev (several lengths: one request of their sum) and aio_write. */
  private async write(spec: IoCommandSpec, argv: readonly string[], aio: boolean): Promise<void> {
    const cmd = spec.name;
    const vector = cmd !== "write";
    const { flags, args } =
      cmd === "write"
        ? this.getopt(spec, argv, "P:zucqfnpbCs:", 2, 2)
        : this.getopt(spec, argv, aio ? "P:zuqfiC" : "CfqP:", 2, Infinity);
    if (aio && flags.has("z") && args.length !== 2)
      this.fail("-z supports only a single length parameter");
    const zero = flags.has("z");
    const compressed = flags.has("c");
    const source = cmd === "write" && flags.has("s") ? String(flags.get("s")) : undefined;
    const vmstate = cmd === "write" && flags.has("b");
    if (vmstate && zero) this.fail("-b and -z cannot be specified at the same time");
    if (cmd === "write" && flags.has("f") && (vmstate || compressed))
      this.fail("-f and -b or -c cannot be specified at the same time");
    if (Number(zero) + Number(flags.has("P")) + Number(source !== undefined) > 1)
      this.fail("Only one of -z, -P, and -s can be specified at the same time");
    if (flags.has("n") && !zero) this.fail("-n requires -z to be specified");
    if (flags.has("u") && !zero) this.fail("-u requires -z to be specified");
    if (zero && compressed) this.fail("-c and -z cannot be specified at the same time");
    const pattern = flags.has("P") ? this.pattern(String(flags.get("P"))) : DEFAULT_WRITE_PATTERN;
    const [offset, length] = vector
      ? this.offLengths(args)
      : this.offLen(args, { noLimit: zero && flags.has("n") });
    // qemu-io's own check for compressed and VM state requests, before the image sees them.
    if (compressed || vmstate) this.sectorAligned(offset, length);
    const fromFile = source === undefined ? undefined : this.sourceData(source, length);
    const w = this.writable();
    const quiet = flags.has("q");
    const t0 = performance.now();
    let op: Promise<void>;
    if (zero) {
      const mayUnmap = flags.has("u");
      op = this.request(offset, length, () => w.writeZeroes(offset, length, { mayUnmap }), true);
    } else if (vmstate) {
      // write -b: the VM state area, which qimg does not serve (see read -b).
      op = Promise.reject(new RequestRefused("Operation not supported"));
    } else {
      const data = fromFile ?? new Uint8Array(length).fill(pattern);
      op = compressed
        ? this.writeCompressed(w, offset, data)
        : this.request(offset, length, () => w.write(offset, data), true);
    }
    const finish = (): void => {
      if (!quiet)
        this.out(
          report(
            "wrote",
            (performance.now() - t0) / 1000,
            offset,
            length,
            length,
            1,
            flags.has("C"),
          ),
        );
    };
    await this.complete(op, finish, aio, cmd, cmd === "writev" ? "writev" : "write");
  }

  /** qemu-io's sector alignment check (write -c, read/write -b), with the numbers as read. */
  private sectorAligned(offset: number, length: number): void {
    if (offset % 512 !== 0) this.fail(`${offset} is not a sector-aligned value for 'offset'`);
    if (length % 512 !== 0) this.fail(`${length} is not a sector-aligned value for 'count'`);
  }

  /**
   * write -s FILE: the data is the file's first `length` bytes, repeated when the file is
   * shorter; a file that cannot be read, or gives no bytes, fails the command (on stderr).
   */
  private sourceData(file: string, length: number): Uint8Array {
    const data = new Uint8Array(length);
    let got = 0;
    try {
      const fd = openSync(file, "r");
      try {
        for (let n = 1; n > 0 && got < length; got += n) {
          n = readSync(fd, data, got, length - got, null);
        }
      } finally {
        closeSync(fd);
      }
    } catch (e) {
      this.ctx.stderr(`${file}: ${this.errorText(e)}\n`);
      throw new CommandFailed();
    }
    if (got === 0) {
      this.ctx.stderr(`${file}: file is empty\n`);
      throw new CommandFailed();
    }
    for (let at = got; at < length; at += got) data.copyWithin(at, 0, Math.min(got, length - at));
    return data;
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

  private async discard(spec: IoCommandSpec, argv: readonly string[]): Promise<void> {
    const { flags, args } = this.getopt(spec, argv, "Cq", 2, 2);
    const [offset, length] = this.offLen(args);
    const w = this.writable();
    const t0 = performance.now();
    try {
      await this.request(offset, length, () => w.discard(offset, length), true);
    } catch (e) {
      this.fail(`discard failed: ${this.errorText(e)}`);
    }
    if (!flags.has("q"))
      this.out(
        report(
          "discard",
          (performance.now() - t0) / 1000,
          offset,
          length,
          length,
          1,
          flags.has("C"),
        ),
      );
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
