/**
 * qemu-io's number and report formats (qemu-io-cmds.c / cutils): cvtstr, timestr, the two
 * report lines after each request, and the -v hex dump.
 */

/** C's `%.{digits}f` (glibc rounds exact ties to even; JS's toFixed rounds them up). */
export function cFixed(x: number, digits: number): string {
  const scaled = x * 10 ** digits;
  if (
    Number.isFinite(scaled) &&
    Math.abs(scaled) < 2 ** 52 &&
    !Number.isInteger(scaled) &&
    Number.isInteger(scaled * 2) &&
    scaled / 10 ** digits === x
  ) {
    const down = Math.floor(scaled);
    const even = down % 2 === 0 ? down : down + 1;
    return (even / 10 ** digits).toFixed(digits);
  }
  return x.toFixed(digits);
}

const UNITS: readonly [number, string][] = [
  [1024 ** 6, " EiB"],
  [1024 ** 5, " PiB"],
  [1024 ** 4, " TiB"],
  [1024 ** 3, " GiB"],
  [1024 ** 2, " MiB"],
  [1024, " KiB"],
];

/** qemu's cvtstr(): "64 KiB", "1.062 MiB", "32 bytes", "1021.075 KiB". */
export function cvtstr(value: number): string {
  let text: string;
  let suffix = " bytes";
  const unit = UNITS.find(([size]) => value >= size);
  if (unit !== undefined) {
    text = cFixed(value / unit[0], 3);
    suffix = unit[1];
  } else {
    text = cFixed(value, 6);
  }
  const trim = text.indexOf(".000");
  return (trim >= 0 ? text.slice(0, trim) : text) + suffix;
}

/** qemu-io's timestr() without flags: "00.02 sec", or "H:MM:SS.ss" from one second on. */
export function timestr(seconds: number): string {
  const whole = Math.floor(seconds);
  const frac = seconds - whole;
  if (whole === 0) return `${cFixed(frac, 2).padStart(5, "0")} sec`;
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = (whole % 60) + frac;
  return `${h}:${String(m).padStart(2, "0")}:${cFixed(s, 2).padStart(5, "0")}`;
}

/** The time as "H:MM:SS.ss" even under a second (the -C report's). */
export function fixedTime(seconds: number): string {
  const whole = Math.floor(seconds);
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const sec = (whole % 60) + (seconds - whole);
  return `${h}:${String(m).padStart(2, "0")}:${cFixed(sec, 2).padStart(5, "0")}`;
}

/**
 * The two lines qemu-io prints after a request (with -C, one machine-readable line):
 * "wrote 65536/65536 bytes at offset 0" and
 * "64 KiB, 1 ops; 00.00 sec (X MiB/sec and Y ops/sec)".
 */
export function report(
  op: string,
  seconds: number,
  offset: number,
  count: number,
  total: number,
  ops: number,
  machine = false,
): string {
  const t = seconds > 0 ? seconds : 1e-9;
  if (machine) {
    // -C: "bytes,ops,H:MM:SS.ss,bytes/sec,ops/sec" on one line.
    return `${total},${ops},${fixedTime(seconds)},${cFixed(total / t, 3)},${cFixed(ops / t, 3)}\n`;
  }
  return (
    `${op} ${total}/${count} bytes at offset ${offset}\n` +
    `${cvtstr(total)}, ${ops} ops; ${timestr(seconds)} (${cvtstr(total / t)}/sec and ${cFixed(ops / t, 4)} ops/sec)\n`
  );
}

function isAlnum(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}

/** qemu-io's dump_buffer() (read -v): offset, 16 hex bytes, then the alphanumerics. */
export function dumpBuffer(buf: Uint8Array, offset: number): string {
  let out = "";
  for (let i = 0; i < buf.length; i += 16) {
    const line = buf.subarray(i, Math.min(i + 16, buf.length));
    out += `${(offset + i).toString(16).padStart(8, "0")}:  `;
    for (const b of line) out += `${b.toString(16).padStart(2, "0")} `;
    out += " ";
    for (const b of line) out += isAlnum(b) ? String.fromCharCode(b) : ".";
    out += "\n";
  }
  return out;
}

/** One line of qemu-io's `help` (and a command's usage line): "NAME [ARGS ]-- TEXT". */
export function helpLine(name: string, args: string, text: string): string {
  return `${name} ${args === "" ? "" : `${args} `}-- ${text}\n`;
}
