/**
 * JSON printed the way QEMU's QObject pretty printer does (qemu-img info --output=json):
 * four-space indentation, `"key": value`, and empty containers printed open, e.g.
 * `"flags": [\n    ]`. Key order is the insertion order of the objects passed in.
 */
export type QJson =
  | string
  | number
  | bigint
  | boolean
  | null
  | readonly QJson[]
  | { readonly [key: string]: QJson | undefined };

export function toQemuJson(value: QJson, indent = 0): string {
  const pad = " ".repeat(indent);
  const inner = " ".repeat(indent + 4);
  if (Array.isArray(value)) {
    const items = (value as readonly QJson[]).map((v) => inner + toQemuJson(v, indent + 4));
    return items.length === 0 ? `[\n${pad}]` : `[\n${items.join(",\n")}\n${pad}]`;
  }
  if (value !== null && typeof value === "object") {
    const items = Object.entries(value)
      .filter((kv): kv is [string, QJson] => kv[1] !== undefined)
      .map(([k, v]) => `${inner}${JSON.stringify(k)}: ${toQemuJson(v, indent + 4)}`);
    return items.length === 0 ? `{\n${pad}}` : `{\n${items.join(",\n")}\n${pad}}`;
  }
  if (typeof value === "bigint") return value.toString();
  return JSON.stringify(value);
}

/**
 * The human dump of a QObject (qemu's dump_qobject, used for "Format specific information"):
 * dashes in keys become spaces, nested containers go one level (4 spaces) deeper, list items
 * print as `[i]:`.
 */
export function dumpQObject(value: QJson, indentation: number): string {
  let out = "";
  const pad = " ".repeat(indentation * 4);
  const composite = (v: QJson): boolean => v !== null && typeof v === "object";
  if (Array.isArray(value)) {
    (value as readonly QJson[]).forEach((v, i) => {
      out += `${pad}[${i}]:${composite(v) ? "\n" : " "}`;
      out += dumpQObject(v, indentation + 1);
      if (!composite(v)) out += "\n";
    });
  } else if (value !== null && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) {
      if (v === undefined) continue;
      out += `${pad}${k.replaceAll("-", " ")}:${composite(v) ? "\n" : " "}`;
      out += dumpQObject(v, indentation + 1);
      if (!composite(v)) out += "\n";
    }
  } else {
    out += typeof value === "string" ? value : String(value);
  }
  return out;
}
