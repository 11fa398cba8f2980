import type { CommandDef } from "../command.js";
import { compareCommand } from "./compare.js";
import { convertCommand } from "./convert.js";
import { ddCommand } from "./dd.js";
import { infoCommand } from "./info.js";
import { mapCommand } from "./map.js";

/** Every command qimg has, in the order `--help` lists them. */
export const COMMANDS: readonly CommandDef[] = [
  compareCommand,
  convertCommand,
  ddCommand,
  infoCommand,
  mapCommand,
];
