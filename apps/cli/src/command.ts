import type { Command } from "commander";
import type { CliContext } from "./context.js";

/** One qimg command: how commander should parse it, and what it does. */
export interface CommandDef {
  readonly name: string;
  /** Add the description, arguments and options to the commander command. */
  configure(cmd: Command): void;
  /** Exit code for errors (qemu-img uses 1 for most commands, 2 for compare). */
  readonly errorExitCode: number;
  /** Run with commander's parsed arguments and options; resolves to the exit code. */
  run(
    ctx: CliContext,
    args: readonly string[],
    opts: Readonly<Record<string, unknown>>,
  ): Promise<number>;
}

/** `--output human|json`, as every command that has it spells it. */
export type OutputFormat = "human" | "json";

export function parseOutputFormat(value: unknown): OutputFormat {
  return value === "json" ? "json" : "human";
}

/** A string option, or undefined. */
export function stringOpt(
  opts: Readonly<Record<string, unknown>>,
  key: string,
): string | undefined {
  const v = opts[key];
  return typeof v === "string" ? v : undefined;
}
