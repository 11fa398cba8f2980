/**
 * Wires the commands into commander. No command logic lives here.
 */
import { readFileSync } from "node:fs";
import { Command, CommanderError } from "commander";
import { COMMANDS } from "./commands/index.js";
import { processContext, type CliContext } from "./context.js";
import { reportError } from "./errors.js";

/** Version from package.json (read at run time: `src/../` and `dist/../` both hold it). */
export function qimgVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as {
      version?: unknown;
    };
    return typeof pkg.version === "string" ? pkg.version : "unknown";
  } catch {
    return "unknown";
  }
}

/** Commander's "error: ..." text as one `qimg: ...` line. */
export function commanderErrorLine(text: string): string {
  const first = text.trim().split("\n")[0] ?? "";
  return `qimg: ${first.replace(/^error: /, "")}\n`;
}

/**
 * Run qimg with `argv` (the arguments after the program name) and resolve to the exit code.
 * Output goes to `ctx` (the process streams by default).
 */
export async function runCli(
  argv: readonly string[],
  ctx: CliContext = processContext(),
): Promise<number> {
  let exitCode = 0;
  if (argv.length === 0) {
    ctx.stderr("qimg: Not enough arguments (try 'qimg --help')\n");
    return 1;
  }
  const program = new Command("qimg")
    .description("qcow2, QED and raw disk image tool, compatible with qemu-img")
    .version(`qimg ${qimgVersion()}`, "-V, --version", "print the version")
    .option("--debug", "print stack traces for every error")
    .helpCommand(true)
    .exitOverride()
    .configureOutput({
      writeOut: (s) => ctx.stdout(s),
      writeErr: (s) => ctx.stderr(s),
      outputError: (s, write) => write(commanderErrorLine(s)),
    });
  program.hook("preAction", (thisCommand) => {
    if (thisCommand.opts().debug === true) ctx.debug = true;
  });

  for (const def of COMMANDS) {
    const cmd = program.command(def.name);
    def.configure(cmd);
    cmd.action(async (...actionArgs: unknown[]) => {
      const self = actionArgs[actionArgs.length - 1] as Command;
      const args = self.processedArgs.flatMap((a: unknown) =>
        Array.isArray(a) ? (a as unknown[]).map(String) : a === undefined ? [] : [argText(a)],
      );
      try {
        exitCode = await def.run(ctx, args, self.opts());
      } catch (e) {
        exitCode = reportError(e, ctx, def.errorExitCode);
      }
    });
  }

  try {
    await program.parseAsync(sizeLast(argv), { from: "user" });
  } catch (e) {
    if (e instanceof CommanderError) {
      // --help and --version exit 0; usage errors were already printed as one line.
      return e.code === "commander.helpDisplayed" ||
        e.code === "commander.version" ||
        e.code === "commander.help"
        ? 0
        : 1;
    }
    return reportError(e, ctx, 1);
  }
  return exitCode;
}

/**
 * `resize FILE -1M`: qemu-img takes resize's last argument as the size before it parses
 * options, so a negative size needs no `--`. Commander would read `-1M` as an unknown
 * option; put the `--` in for it.
 */
export function sizeLast(argv: readonly string[]): string[] {
  const command = argv.findIndex((a) => !a.startsWith("-"));
  const last = argv[argv.length - 1] ?? "";
  const rest = argv.slice(command + 1, -1);
  if (argv[command] !== "resize" || !/^-[\d.]/.test(last) || rest.includes("--")) {
    return [...argv];
  }
  return [...argv.slice(0, -1), "--", last];
}

/** A parsed commander argument as text. */
function argText(a: unknown): string {
  return typeof a === "string" ? a : (JSON.stringify(a) ?? "");
}
