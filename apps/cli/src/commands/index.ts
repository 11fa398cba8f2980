import type { CommandDef } from "../command.js";
import { amendCommand } from "./amend.js";
import { benchCommand } from "./bench.js";
import { bitmapCommand } from "./bitmap.js";
import { checkCommand } from "./check.js";
import { commitCommand } from "./commit.js";
import { compareCommand } from "./compare.js";
import { convertCommand } from "./convert.js";
import { createCommand } from "./create.js";
import { ddCommand } from "./dd.js";
import { infoCommand } from "./info.js";
import { ioCommand } from "./io.js";
import { mapCommand } from "./map.js";
import { measureCommand } from "./measure.js";
import { rebaseCommand } from "./rebase.js";
import { resizeCommand } from "./resize.js";
import { serveCommand } from "./serve.js";
import { snapshotCommand } from "./snapshot.js";

/** Every command qimg has, in the order `--help` lists them. */
export const COMMANDS: readonly CommandDef[] = [
  amendCommand,
  benchCommand,
  bitmapCommand,
  checkCommand,
  commitCommand,
  compareCommand,
  convertCommand,
  createCommand,
  ddCommand,
  infoCommand,
  ioCommand,
  mapCommand,
  measureCommand,
  rebaseCommand,
  resizeCommand,
  serveCommand,
  snapshotCommand,
];
