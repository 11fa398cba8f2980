/** commander helpers the commands share. */

/** commander collector for repeatable options. */
export function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** The joined text of repeated `-o` options (qemu-img joins them with commas). */
export function joinedOptions(opts: Readonly<Record<string, unknown>>): string | undefined {
  const v = opts.options;
  return Array.isArray(v) && v.length > 0 ? v.map(String).join(",") : undefined;
}
