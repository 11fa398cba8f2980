/**
 * The names of qimg's commands, for the executable's code cache (src/bin.ts), which must not
 * load the CLI to learn them. A test keeps this list equal to the commands the CLI wires.
 */
export const COMMAND_NAMES: readonly string[] = [
  "amend",
  "bench",
  "bitmap",
  "check",
  "commit",
  "compare",
  "convert",
  "create",
  "dd",
  "info",
  "io",
  "map",
  "measure",
  "rebase",
  "resize",
  "serve",
  "snapshot",
];
