import type { CommandDef } from "../command.js";
import { benchCommand } from "./bench.js";
import { checkCommand } from "./check.js";
import { compareCommand } from "./compare.js";
import { convertCommand } from "./convert.js";
import { createCommand } from "./create.js";
import { ddCommand } from "./dd.js";
import { infoCommand } from "./info.js";
import { ioCommand } from "./io.js";
import { mapCommand } from "./map.js";
import { resizeCommand } from "./resize.js";
// @imports: one line per new command below this marker, each helper its own line
import { serveCommand } from "./serve.js";
import { measureCommand } from "./measure.js";
import { snapshotCommand } from "./snapshot.js";
import { bitmapCommand } from "./bitmap.js";
import { amendCommand } from "./amend.js";
import { commitCommand } from "./commit.js";
import { rebaseCommand } from "./rebase.js";

/** Every command qimg has, in the order `--help` lists them. */
export const COMMANDS: readonly CommandDef[] = [
  benchCommand,
  checkCommand,
  compareCommand,
  convertCommand,
  createCommand,
  ddCommand,
  infoCommand,
  ioCommand,
  mapCommand,
  resizeCommand,
  // @entries: one line per new command below this marker, each helper its own line
  serveCommand,
  measureCommand,
  snapshotCommand,
  bitmapCommand,
  amendCommand,
  commitCommand,
  rebaseCommand,
];
