/**
 * `--image-opts` / `--target-image-opts`: an image named by a QEMU option string instead of a
 * file name. qimg reads the forms that name a file: `driver=FMT,file.filename=PATH` (also
 * `file.driver=file` and the plain `filename=PATH`); `,,` stands for a comma in a value, as in
 * QEMU.
 */
import { CliError } from "../errors.js";

/** A parsed option string: the file and, when given, its format. */
export interface ImageOpts {
  readonly filename: string;
  readonly driver: string | undefined;
}

/** Split `text` at single commas (`,,` is a literal comma). */
function splitOptions(text: string): string[] {
  const parts: string[] = [];
  let cur = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ",") {
      if (text[i + 1] === ",") {
        cur += ",";
        i++;
        continue;
      }
      parts.push(cur);
      cur = "";
    } else {
      cur += c;
    }
  }
  parts.push(cur);
  return parts;
}

/** Parse an option string naming an image (see the module comment). */
export function parseImageOpts(text: string): ImageOpts {
  const fail = (why: string): CliError => new CliError(`Could not open '${text}': ${why}`);
  if (!text.includes("=")) {
    // QEMU takes a bare name as a node to find among open block devices.
    throw fail(`Cannot find device='${text}' nor node-name='${text}'`);
  }
  let filename: string | undefined;
  let driver: string | undefined;
  const unknown: string[] = [];
  for (const part of splitOptions(text)) {
    const eq = part.indexOf("=");
    const key = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? "on" : part.slice(eq + 1);
    switch (key) {
      case "driver":
        driver = value;
        break;
      case "file.filename":
      case "filename":
        filename = value;
        break;
      case "file.driver":
        if (value !== "file")
          throw fail(`qimg opens images from files only, not file.driver=${value}`);
        break;
      default:
        unknown.push(key);
    }
  }
  if (filename === undefined) throw fail('A block device must be specified for "file"');
  if (unknown.length > 0) {
    throw fail(
      driver === undefined
        ? `qimg reads only driver=, file.filename= and file.driver=file, not '${unknown[0]}'`
        : `Block format '${driver}' does not support the option '${unknown[0]}'`,
    );
  }
  return { filename, driver };
}
