/**
 * qemu's `-o key=value,...` option lists (QemuOpts): parsing with qemu's rules and messages,
 * the `-o help` listing, and the "Formatting '...'" line qemu-img create prints.
 *
 * - `,,` is a literal comma inside a value; options from several `-o` are joined with `,`.
 * - A key without `=` is a boolean set to "on" (`lazy_refcounts` alone means on).
 * - Booleans take on/off (and yes/no, true/false, y/n as qemu's qapi_bool_parse).
 * - Sizes take qemu's suffixes; numbers must be plain integers.
 */
import { CliError } from "../errors.js";
import { parseSize } from "./size.js";

export type OptType = "str" | "bool" | "size" | "num";

export interface OptDesc {
  readonly name: string;
  readonly type: OptType;
  readonly help: string;
  /** Printed in the Formatting line when the option is not set (qemu's def_value_str). */
  readonly defaultText?: string;
}

/** One parsed option: the text as given and, for sizes and numbers, the value. */
export interface OptValue {
  readonly text: string;
  readonly value: string | number | boolean;
}

export type OptMap = Map<string, OptValue>;

const TYPE_LABEL: Readonly<Record<OptType, string>> = {
  str: "<str>",
  bool: "<bool (on/off)>",
  size: "<size>",
  num: "<num>",
};

/** Split `a=b,c=d` with `,,` escapes into [key, value | undefined] pairs. */
export function splitOptions(text: string): [string, string | undefined][] {
  const out: [string, string | undefined][] = [];
  let i = 0;
  while (i < text.length) {
    let item = "";
    while (i < text.length) {
      const c = text[i] ?? "";
      if (c === ",") {
        if (text[i + 1] === ",") {
          item += ",";
          i += 2;
          continue;
        }
        break;
      }
      item += c;
      i++;
    }
    i++; // the separating comma
    if (item === "") continue;
    const eq = item.indexOf("=");
    out.push(eq < 0 ? [item, undefined] : [item.slice(0, eq), item.slice(eq + 1)]);
  }
  return out;
}

/** True when the joined `-o` text asks for the option list (`help` or `?`). */
export function isHelpRequest(text: string): boolean {
  return splitOptions(text).some(([k, v]) => v === undefined && (k === "help" || k === "?"));
}

export function parseBool(name: string, text: string): boolean {
  if (["on", "yes", "true", "y"].includes(text)) return true;
  if (["off", "no", "false", "n"].includes(text)) return false;
  throw new CliError(`Parameter '${name}' expects 'on' or 'off'`);
}

/**
 * Parse `text` against `descs`. Errors (with the file they concern) use qemu's messages:
 * "Invalid parameter 'x'", "Parameter 'x' expects ...".
 */
export function parseOptions(
  text: string,
  descs: readonly OptDesc[],
  file: string | undefined,
): OptMap {
  const out: OptMap = new Map();
  for (const [key, raw] of splitOptions(text)) {
    const desc = descs.find((d) => d.name === key);
    if (desc === undefined) throw new CliError(`Invalid parameter '${key}'`, { file });
    const given = raw ?? (desc.type === "bool" ? "on" : "");
    try {
      switch (desc.type) {
        case "bool":
          out.set(key, { text: given, value: parseBool(key, given) });
          break;
        case "size": {
          let v: number;
          try {
            v = parseSize(given);
          } catch {
            throw new CliError(`Parameter '${key}' expects a non-negative number below 2^64`);
          }
          out.set(key, { text: String(v), value: v });
          break;
        }
        case "num": {
          if (!/^\d+$/.test(given)) throw new CliError(`Parameter '${key}' expects a number`);
          out.set(key, { text: given, value: Number(given) });
          break;
        }
        default:
          out.set(key, { text: given, value: given });
      }
    } catch (e) {
      if (e instanceof CliError) throw new CliError(e.message, { file });
      throw e;
    }
  }
  return out;
}

/** `qemu-img create -f FMT -o help`: the options sorted by name, qemu's column layout. */
export function optionsHelp(format: string, descs: readonly OptDesc[]): string {
  const lines = [...descs]
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    .map((d) => `  ${`${d.name}=${TYPE_LABEL[d.type]}`.padEnd(22)} - ${d.help}`);
  return (
    `Supported ${format} options:\n${lines.join("\n")}\n\n` +
    "The protocol level may support further options.\n" +
    "Specify the target filename to include those options.\n"
  );
}

/**
 * The `Formatting 'FILE', fmt=FMT k=v ...` line: options in `printOrder`, each printed when
 * set (as given; sizes in bytes) or when it has a default.
 */
export function formattingLine(
  file: string,
  format: string,
  opts: OptMap,
  printOrder: readonly OptDesc[],
): string {
  const parts = [`Formatting '${file}', fmt=${format}`];
  for (const d of printOrder) {
    const v = opts.get(d.name);
    if (v !== undefined) parts.push(`${d.name}=${v.text}`);
    else if (d.defaultText !== undefined) parts.push(`${d.name}=${d.defaultText}`);
  }
  return parts.join(" ") + "\n";
}
