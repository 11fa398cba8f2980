/**
 * `qimg serve [-k SOCKET | -p PORT -b ADDR] [-x NAME] [-r] [-f FMT] [-e N] [-t] [-B BITMAP]
 * [--cache MODE] [--discard MODE] [--detect-zeroes MODE] FILE`: export an image over NBD
 * with qemu-nbd's flags, so `qemu-img`, `nbdcopy`, `nbdinfo`, a VM (`-drive
 * file=nbd://...`) or the kernel's `nbd-client` can use it.
 *
 * Differences from qemu-nbd: TCP binds 127.0.0.1 unless `-b` says otherwise (qemu-nbd binds
 * 0.0.0.0); no TLS, no `--fork`, no `-c /dev/nbdX`; `--cache=none|directsync` do not bypass
 * the host page cache (they behave as writeback and writethrough).
 */
import type { Command } from "commander";
import { Option } from "commander";
import type { DirtyBitmapSource } from "@qimg/nbd";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, inFile, messageOf } from "../errors.js";
import { openImage } from "../open.js";
import type { WritableDiskImage } from "../drivers.js";

/** Options of {@link runServe}, as qemu-nbd names them. */
export interface ServeCommandOptions {
  readonly filename: string;
  readonly format?: string | undefined;
  readonly socket?: string | undefined;
  readonly port?: string | undefined;
  readonly bind?: string | undefined;
  readonly exportName?: string | undefined;
  readonly description?: string | undefined;
  readonly readOnly?: boolean;
  readonly shared?: string | undefined;
  readonly persistent?: boolean;
  readonly bitmap?: string | undefined;
  readonly cache?: string | undefined;
  readonly discard?: string | undefined;
  readonly detectZeroes?: string | undefined;
  /** Called once the server listens (tests; the CLI prints nothing, as qemu-nbd). */
  readonly onListening?:
    ((address: { socket?: string; host?: string; port?: number }) => void) | undefined;
  /** Stops the server when it aborts (tests); the real process stops on SIGINT/SIGTERM. */
  readonly signal?: AbortSignal | undefined;
}

const CACHE_MODES = ["none", "writeback", "writethrough", "directsync", "unsafe"] as const;

/** What `-B` needs of a driver: qcow2's persistent bitmap listing and dirty extents. */
interface WithBitmaps {
  listBitmaps?: () => readonly { readonly name: string; readonly inUse: boolean }[];
  bitmapStatus?: (
    name: string,
    offset: number,
    length: number,
  ) => Promise<{ length: number; dirty: boolean }>;
}

/**
 * The persistent bitmap named by `-B` as an NBD metadata source. Checked at start-up, as
 * qemu-nbd does: a missing bitmap (or a format without bitmaps) and an inconsistent one
 * (in use on disk) are refused with qemu-nbd's words.
 */
function bitmapSource(image: WritableDiskImage, name: string): DirtyBitmapSource {
  const b = image as WritableDiskImage & WithBitmaps;
  const found = b.listBitmaps?.().find((x) => x.name === name);
  if (found === undefined || typeof b.bitmapStatus !== "function") {
    throw new CliError(`Bitmap '${name}' is not found`);
  }
  if (found.inUse) throw new CliError(`Bitmap '${name}' is inconsistent and cannot be used`);
  const status = b.bitmapStatus.bind(image);
  return { name, status: (offset, length) => status(name, offset, length) };
}

export async function runServe(ctx: CliContext, options: ServeCommandOptions): Promise<number> {
  const cache = options.cache ?? "writeback";
  if (!(CACHE_MODES as readonly string[]).includes(cache)) {
    throw new CliError(`Invalid cache mode \`${cache}'`);
  }
  const discardMode = options.discard ?? "ignore";
  if (!["ignore", "off", "unmap", "on"].includes(discardMode)) {
    throw new CliError(`Invalid discard mode \`${discardMode}'`);
  }
  const discard = discardMode === "unmap" || discardMode === "on";
  const detect = options.detectZeroes ?? "off";
  if (detect !== "off" && detect !== "on" && detect !== "unmap") {
    throw new CliError(`Failed to parse detect_zeroes mode: invalid parameter value: ${detect}`);
  }
  if (detect === "unmap" && !discard) {
    throw new CliError(
      "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
    );
  }
  let shared = 1;
  if (options.shared !== undefined) {
    shared = /^\d+$/.test(options.shared) ? Number(options.shared) : -1;
    if (shared < 0 || shared > 2 ** 31 - 1)
      throw new CliError(`Invalid shared device number '${options.shared}'`);
  }
  let port = 10809;
  if (options.port !== undefined) {
    port = /^\d+$/.test(options.port) ? Number(options.port) : -1;
    if (port < 0 || port > 65535) {
      throw new CliError(
        `address resolution failed for ${options.bind ?? "127.0.0.1"}:${options.port}: Servname not supported for ai_socktype`,
      );
    }
  }
  const readOnly = options.readOnly === true;
  const image = await openImage(options.filename, {
    format: options.format,
    readOnly,
    ctx,
    noFlush: cache === "unsafe",
  });
  let closed = false;
  const closeImage = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    await inFile(options.filename, () => image.close());
  };
  try {
    const bitmaps = options.bitmap === undefined ? [] : [bitmapSource(image, options.bitmap)];
    const { serve } = await import("@qimg/nbd/node");
    const server = await serve(image, {
      socket: options.socket,
      port,
      host: options.bind ?? "127.0.0.1",
      exportName: options.exportName ?? "",
      description: options.description,
      readOnly,
      shared,
      persistent: options.persistent === true,
      bitmaps,
      discard,
      detectZeroes: detect,
      writethrough: cache === "writethrough" || cache === "directsync",
      onError: (e) => {
        if (ctx.debug) ctx.stderr(`qimg: serve: ${messageOf(e, options.filename)}\n`);
      },
    }).catch((e: unknown) => {
      const where = options.socket ?? `${options.bind ?? "127.0.0.1"}:${port}`;
      throw new CliError(`Failed to listen on ${where}: ${messageOf(e, where)}`, { cause: e });
    });
    options.onListening?.(server.address);
    const stop = (): void => {
      void server.close();
    };
    const real = options.signal === undefined;
    if (real) {
      process.on("SIGINT", stop);
      process.on("SIGTERM", stop);
    } else options.signal?.addEventListener("abort", stop);
    try {
      await server.done;
    } finally {
      if (real) {
        process.off("SIGINT", stop);
        process.off("SIGTERM", stop);
      } else options.signal?.removeEventListener("abort", stop);
    }
    await closeImage();
    return 0;
  } finally {
    await closeImage().catch(() => undefined);
  }
}

export const serveCommand: CommandDef = {
  name: "serve",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description(
        "export an image over NBD for qemu, qemu-img, nbdcopy, nbd-client (qemu-nbd's flags). " +
          "No authentication, no encryption: binding TCP to anything but 127.0.0.1 lets everyone who reaches the port read (and, without -r, write) the image",
      )
      .argument("<filename>", "image file")
      .option("-k, --socket <path>", "listen on this Unix socket instead of TCP")
      .option("-p, --port <port>", "TCP port to listen on (default 10809)")
      .option(
        "-b, --bind <addr>",
        "TCP address to listen on (default 127.0.0.1; qemu-nbd's default 0.0.0.0 would expose the image to the network)",
      )
      .option("-x, --export-name <name>", "the export's name (default '')")
      .option("-D, --description <text>", "the export's description")
      .option(
        "-r, --read-only",
        "export read-only (writes fail with EPERM; the file is opened read-only)",
      )
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .option("-e, --shared <n>", "clients served at once (default 1, 0 = no limit)")
      .option("-t, --persistent", "keep serving after the last client disconnects")
      .option("-B, --bitmap <name>", "export this persistent bitmap as qemu:dirty-bitmap:NAME")
      .addOption(
        new Option(
          "--cache <mode>",
          "cache mode: none, writeback (default), writethrough, directsync, unsafe",
        ),
      )
      .addOption(
        new Option("--discard <mode>", "ignore (default) or unmap: whether trims release clusters"),
      )
      .addOption(
        new Option(
          "--detect-zeroes <mode>",
          "off (default), on, or unmap: turn all-zero writes into zero writes",
        ),
      );
  },
  run(ctx, args, opts) {
    return runServe(ctx, {
      filename: args[0] ?? "",
      format: stringOpt(opts, "format"),
      socket: stringOpt(opts, "socket"),
      port: stringOpt(opts, "port"),
      bind: stringOpt(opts, "bind"),
      exportName: stringOpt(opts, "exportName"),
      description: stringOpt(opts, "description"),
      readOnly: opts.readOnly === true,
      shared: stringOpt(opts, "shared"),
      persistent: opts.persistent === true,
      bitmap: stringOpt(opts, "bitmap"),
      cache: stringOpt(opts, "cache"),
      discard: stringOpt(opts, "discard"),
      detectZeroes: stringOpt(opts, "detectZeroes"),
    });
  },
};
