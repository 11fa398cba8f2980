/**
 * The names of qimg's commands, for the executable's code cache (src/bin.ts), which must not
 * load the CLI to learn them. A test keeps this list equal to the commands the CLI wires.
 */
export const COMMAND_NAMES: readonly string[] = [
  "bench",
  "check",
  "compare",
  "convert",
  "create",
  "dd",
  "info",
  "io",
  "map",
  "resize",
  // @names: one line per new command below this marker
  "serve",
  "measure",
  "snapshot",
  "bitmap",
  "amend",
  "commit",
  "rebase",
];
