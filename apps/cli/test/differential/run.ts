/**
 * The differential runner: replays one generated case (gen.ts) on twin images, one made and
 * changed by QEMU (qemu-img create, qemu-io, qemu-img resize, qemu-img convert), the other by
 * qimg (in-process, the same command lines), and returns what differs:
 *  - exit statuses of create / every operation / resize / convert (both succeed or both refuse),
 *  - guest bytes and virtual size (qemu-img compare between the twins and between each pair of
 *    converted outputs; with data_file_raw, the raw data files too),
 *  - `qemu-img check` clean on qimg's images, `qimg check` clean on QEMU's,
 *  - a refused create leaves no file behind; no internal errors.
 * `shrink` drops operations and conversions while the same failure remains.
 */
import { spawn } from "node:child_process";
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeSync,
} from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { seededRandom } from "@qimg/io";
import { CLI_DIR, qimg } from "../helpers.js";
import {
  type AnyFormat,
  type CaseSpec,
  type Convert,
  type Op,
  SNAPSHOT_FLAG,
  bitmapOptions,
  ioCommand,
  ioLines,
  roundSector,
} from "./gen.js";
import { GuestModel, backingBytes, firstBitMismatch, firstMismatchOf } from "./model.js";

export interface Outcome {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** One command, as run, for the repro script. */
interface Step {
  readonly tool: "qemu-img" | "qemu-io" | "qimg" | "#";
  readonly args: readonly string[];
}

export interface Failure {
  /** Stable signature used to group findings and to keep shrinking on the same failure. */
  readonly category: string;
  readonly detail: string;
}

export interface CaseResult {
  readonly spec: CaseSpec;
  /** QEMU refused the create options: nothing else was run. */
  readonly skipped: boolean;
  /** qemu-img's reason when it refused the create options. */
  readonly skipReason?: string | undefined;
  readonly failures: readonly Failure[];
  /** What the harness noticed that is QEMU's problem, not qimg's. */
  readonly notes: readonly string[];
  /** Commands that rebuild the twins, with the case directory as ".". */
  readonly repro: string;
}

const MAIN = join(CLI_DIR, "src", "main.ts");
const TSX = pathToFileURL(createRequire(join(CLI_DIR, "package.json")).resolve("tsx")).href;

/** Milliseconds spent per tool and command, for tuning the slice. */
export const timings = new Map<string, { ms: number; n: number }>();
function timed<T>(key: string, p: Promise<T>): Promise<T> {
  const t0 = performance.now();
  return p.finally(() => {
    const t = timings.get(key) ?? { ms: 0, n: 0 };
    t.ms += performance.now() - t0;
    t.n++;
    timings.set(key, t);
  });
}

function spawnTool(tool: string, args: readonly string[]): Promise<Outcome> {
  return new Promise((resolve) => {
    const p = spawn(tool, args, {
      env: { ...process.env, LC_ALL: "C" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (s: string) => (stdout += s));
    p.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s));
    p.on("error", (e) => resolve({ code: -1, stdout, stderr: stderr + String(e) }));
    p.on("close", (code, signal) => resolve({ code: code ?? (signal ? 128 : -1), stdout, stderr }));
  });
}

const quote = (s: string): string =>
  /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;

class Session {
  readonly steps: Step[] = [];
  readonly failures: Failure[] = [];
  /** Things seen that are not qimg's failures (QEMU's own inconsistencies). */
  readonly notes: string[] = [];
  constructor(readonly dir: string) {}

  path(name: string): string {
    return join(this.dir, name);
  }

  async qemuImg(args: readonly string[]): Promise<Outcome> {
    this.steps.push({ tool: "qemu-img", args });
    return timed(`qemu-img ${args[0] ?? ""}`, spawnTool("qemu-img", args));
  }

  /** qemu-io; `lineBuffered` keeps its output when the run ends in abort (stdio to a pipe). */
  async qemuIo(args: readonly string[], lineBuffered = false): Promise<Outcome> {
    if (lineBuffered) {
      this.steps.push({ tool: "#", args: [`stdbuf -oL qemu-io ${args.map(quote).join(" ")}`] });
      return timed("qemu-io", spawnTool("stdbuf", ["-oL", "qemu-io", ...args]));
    }
    this.steps.push({ tool: "qemu-io", args });
    return timed("qemu-io", spawnTool("qemu-io", args));
  }

  async qimg(args: readonly string[], what: string): Promise<Outcome> {
    this.steps.push({ tool: "qimg", args });
    let r: Outcome;
    try {
      r = await timed(`qimg ${args[0] ?? ""}`, qimg(args));
    } catch (e) {
      r = {
        code: -2,
        stdout: "",
        stderr: `thrown: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`,
      };
    }
    if (r.code === -2 || /internal error/.test(r.stderr)) {
      this.fail(`internal-error:${what}`, `qimg ${args.join(" ")}: ${r.stderr.trim()}`);
    }
    return r;
  }

  note(text: string): void {
    this.steps.push({ tool: "#", args: [text] });
  }

  /** qimg as a separate process (node + tsx from source), for runs that end in a crash. */
  async qimgProcess(args: readonly string[]): Promise<Outcome> {
    this.steps.push({ tool: "qimg", args });
    const r = await timed(
      "qimg (process)",
      spawnTool(process.execPath, ["--conditions=@qimg/source", "--import", TSX, MAIN, ...args]),
    );
    if (/internal error/.test(r.stderr)) {
      this.fail("internal-error:io", `qimg ${args.join(" ")}: ${r.stderr.trim()}`);
    }
    return r;
  }

  fail(category: string, detail: string): void {
    this.failures.push({ category, detail });
  }

  repro(): string {
    const rel = (a: string): string => quote(a.split(`${this.dir}/`).join(""));
    return this.steps
      .map((s) =>
        s.tool === "#"
          ? (s.args[0] ?? "").split(`${this.dir}/`).join("")
          : `${s.tool} ${s.args.map(rel).join(" ")}`,
      )
      .join("\n");
  }
}

/** Write the backing file's random content as raw, then convert it with qemu-img if needed. */
async function makeBacking(
  s: Session,
  spec: CaseSpec,
): Promise<{ file: string; format: AnyFormat } | undefined> {
  const b = spec.backing;
  if (b === undefined) return undefined;
  const raw = s.path("base.raw");
  s.note(
    `# base.raw: ${b.size} bytes, random in ${b.extents.map((e) => `[${e.off}, +${e.len})`).join(" ")}, zeros elsewhere (e.g. head -c ${b.size} /dev/urandom > base.raw)`,
  );
  const fd = openSync(raw, "w");
  try {
    const rnd = seededRandom(b.seed);
    for (const e of b.extents) {
      const buf = Buffer.alloc(e.len);
      for (let i = 0; i < e.len; i++) buf[i] = Math.floor(rnd() * 256);
      writeSync(fd, buf, 0, e.len, e.off);
    }
  } finally {
    closeSync(fd);
  }
  // Make the raw file exactly b.size long (the extents may end before it).
  truncateSync(raw, b.size);
  if (b.format === "raw") return { file: raw, format: "raw" };
  const file = s.path(`base.${b.format}`);
  const r = await s.qemuImg(["convert", "-f", "raw", "-O", b.format, raw, file]);
  if (r.code !== 0) throw new Error(`could not make the backing file: ${r.stderr}`);
  return { file, format: b.format };
}

/**
 * The qemu-io command list of a run of operations, each followed by a marker read
 * (`read <i> 1`, reported as "read 1/1 bytes at offset <i>") so that the output of every
 * operation can be told apart, even when two operations print the same line.
 */
export function ioCommands(ops: readonly Op[]): string[] {
  return ops.flatMap((op, i) => [...ioLines(op).flatMap((l) => ["-c", l]), "-c", `read ${i} 1`]);
}

/**
 * Per-operation outcome from qemu-io's (or qimg io's) stdout: an operation succeeded iff its
 * report line ("wrote ...", "discard ...") comes before its marker; flush iff no "failed".
 * An operation whose marker is missing (the run stopped) counts as failed.
 */
export function opStatuses(ops: readonly Op[], stdout: string): boolean[] {
  return opOutputs(ops, stdout).map((o) => o.ok);
}

/** Each operation's outcome and its own output lines. */
export function opOutputs(ops: readonly Op[], stdout: string): { ok: boolean; text: string }[] {
  const lines = stdout.split("\n");
  const out: { ok: boolean; text: string }[] = [];
  let at = 0;
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i] as Op;
    const marker = `read 1/1 bytes at offset ${i}`;
    let end = at;
    while (end < lines.length && lines[end] !== marker) end++;
    const own = lines.slice(at, end);
    const text = own.filter((l) => l.trim() !== "" && !/^\d.*ops; /.test(l)).join(" | ");
    if (end >= lines.length) {
      out.push({ ok: false, text: `${text} (no output: the run stopped)` });
      continue;
    }
    at = end + 1;
    if (op.k === "aio") {
      out.push({
        ok: op.parts.every((p) => own.includes(`wrote ${p.len}/${p.len} bytes at offset ${p.off}`)),
        text,
      });
    } else if (op.k === "flush" || op.k === "resize" || op.k === "snapshot" || op.k === "bitmap") {
      out.push({ ok: !own.some((l) => /failed/.test(l)), text });
    } else {
      const word = op.k === "discard" ? "discard" : "wrote";
      out.push({ ok: own.includes(`${word} ${op.len}/${op.len} bytes at offset ${op.off}`), text });
    }
  }
  return out;
}

const firstLines = (s: string, n = 4): string =>
  s
    .split("\n")
    .filter(
      (l) => l.trim() !== "" && !/^\d.*ops; /.test(l) && !/^read 1\/1 bytes at offset \d+$/.test(l),
    )
    .slice(0, n)
    .join(" | ");

async function compareImages(
  s: Session,
  category: string,
  a: { file: string; format: AnyFormat },
  b: { file: string; format: AnyFormat },
): Promise<void> {
  const r = await s.qemuImg(["compare", "-f", a.format, "-F", b.format, a.file, b.file]);
  if (r.code !== 0) s.fail(`${category}:content`, firstLines(r.stdout + r.stderr));
  else if (/size mismatch/i.test(r.stdout)) s.fail(`${category}:size`, firstLines(r.stdout));
}

async function checkBoth(
  s: Session,
  category: string,
  ours: string,
  theirs: string | undefined,
  format: AnyFormat,
): Promise<string> {
  if (format === "raw") return "";
  const q = await s.qemuImg(["check", "-f", format, ours]);
  if (q.code !== 0)
    s.fail(
      `${category}:qemu-check-on-qimg`,
      `exit ${q.code}: ${firstLines(q.stdout + q.stderr, 6)}`,
    );
  if (theirs !== undefined) {
    const o = await s.qimg(["check", "-f", format, theirs], `${category}:check`);
    // QEMU 7.2 sometimes corrupts its own image (e.g. compressed data packed into a host cluster
    // that holds a normal data cluster); then qimg's verdict must only agree with qemu-img's.
    const self = o.code === 0 ? undefined : await s.qemuImg(["check", "-f", format, theirs]);
    if (self !== undefined && self.code === o.code) {
      s.notes.push(`qemu-img check also fails on QEMU's own image (exit ${self.code})`);
    } else if (o.code !== 0)
      s.fail(
        `${category}:qimg-check-on-qemu`,
        `exit ${o.code}: ${firstLines(o.stdout + o.stderr, 6)}`,
      );
  }
  return q.stdout;
}

/** The "N% compressed clusters" figure of qemu-img check's report (0 when absent). */
const compressedShare = (checkOutput: string): number =>
  Number(/([\d.]+)% compressed clusters/.exec(checkOutput)?.[1] ?? 0);

/** Where QEMU stored compressed clusters, qimg must store some too (not all uncompressed). */
async function compareCompression(
  s: Session,
  category: string,
  oursCheck: string,
  theirs: string,
  format: AnyFormat,
): Promise<void> {
  if (format !== "qcow2") return;
  const q = await s.qemuImg(["check", "-f", format, theirs]);
  const qShare = compressedShare(q.stdout);
  const oShare = compressedShare(oursCheck);
  if (qShare > 0 && oShare === 0) {
    s.fail(`${category}:nothing-compressed`, `QEMU's: ${qShare}% compressed clusters; qimg's: 0%`);
  }
}

function convertLabel(c: Convert): string {
  return `${c.format}${c.compress ? "-c" : ""}${c.keepBacking ? "-backing" : ""}`;
}

/** Stderr and stdout of a qemu-img / qimg command with the tool's name and the twin's file cut. */
const normalized = (r: Outcome, file: string): string =>
  (r.stdout + r.stderr)
    .split(file)
    .join("FILE")
    .replace(/^(qemu-img|qimg): /gm, "")
    .trim();

/**
 * A snapshot or bitmap action on both twins: `qemu-img snapshot|bitmap` on QEMU's, `qimg
 * snapshot|bitmap` on qimg's. Both must succeed or both refuse, with qemu-img's words; a
 * refusal leaves qimg's file byte-identical. The model follows QEMU's outcome.
 */
async function runAction(
  s: Session,
  op: Extract<Op, { k: "snapshot" | "bitmap" }>,
  q: string,
  o: string,
  model: GuestModel,
  diverged: () => boolean,
): Promise<void> {
  const label = `${op.k}-${op.act}`;
  const args = (file: string): string[] =>
    op.k === "snapshot"
      ? ["snapshot", SNAPSHOT_FLAG[op.act], op.name, file]
      : ["bitmap", ...bitmapOptions(op), file, op.name];
  const qr = await s.qemuImg(args(q));
  const before = readFileSync(o);
  const or = await s.qimg(args(o), label);
  const [qok, ook] = [qr.code === 0, or.code === 0];
  if (qok) {
    let done: Op = op;
    if (op.k === "bitmap" && op.act === "add" && op.granularity === undefined) {
      // The default granularity (from the cluster size) is QEMU's choice: read it back.
      done = { ...op, granularity: bitmapDirty(q).get(op.name)?.granularity };
    }
    try {
      model.apply(done);
    } catch (e) {
      s.fail("harness-error", `the model cannot follow ${ioCommand(op)}: ${String(e)}`);
    }
  } else {
    s.note(`# QEMU refused ${ioCommand(op)}: ${firstLines(qr.stderr, 1)}`);
  }
  if (diverged()) return;
  if (qok !== ook) {
    s.fail(
      `op:${label}:${qok ? "qimg-refuses" : "qimg-accepts"}`,
      `'${ioCommand(op)}': qemu-img exit ${qr.code} (${firstLines(qr.stderr)}), qimg exit ${or.code} (${firstLines(or.stderr)})`,
    );
    return;
  }
  if (qr.code !== or.code || normalized(qr, q) !== normalized(or, o)) {
    s.fail(
      `message:${label}`,
      `'${ioCommand(op)}': qemu-img exit ${qr.code}: ${normalized(qr, q) || "(nothing)"}; qimg exit ${or.code}: ${normalized(or, o) || "(nothing)"}`,
    );
  }
  if (!ook && !before.equals(readFileSync(o))) {
    s.fail(`refused-changed-file:${label}`, `'${ioCommand(op)}' refused, yet qimg's file changed`);
  }
}

/** What `qemu-img info --output=json` says of a twin's size, snapshots and bitmaps. */
interface ManagedFacts {
  readonly size: number;
  /** "ID NAME VM-STATE-SIZE" per snapshot, in table order. */
  readonly snapshots: readonly string[];
  /** The bitmaps entry of format-specific data, as JSON text. */
  readonly bitmaps: string;
  readonly bitmapList: readonly { name: string; granularity: number; flags: string[] }[];
}

async function managedFacts(s: Session, format: AnyFormat, file: string): Promise<ManagedFacts> {
  const r = await s.qemuImg(["info", "-f", format, "--output=json", file]);
  const info = JSON.parse(r.stdout || "{}") as {
    "virtual-size"?: number;
    snapshots?: { id: string; name: string; "vm-state-size": number }[];
    "format-specific"?: {
      data?: { bitmaps?: { name: string; granularity: number; flags: string[] }[] };
    };
  };
  const bitmaps = info["format-specific"]?.data?.bitmaps;
  return {
    size: info["virtual-size"] ?? -1,
    snapshots: (info.snapshots ?? []).map((x) => `${x.id} ${x.name} ${x["vm-state-size"]}`),
    bitmaps: JSON.stringify(bitmaps ?? null),
    bitmapList: bitmaps ?? [],
  };
}

/**
 * After the operations, for cases with snapshots or bitmaps: both twins list the same
 * snapshots (ids, names) and bitmaps (names, granularity, flags), as the model says, at the
 * model's disk size; every snapshot reads the same on both twins and as the model kept it;
 * every bitmap has the same dirty bits on both twins and the ones the model marked.
 */
async function compareManaged(
  s: Session,
  spec: CaseSpec,
  q: string,
  o: string,
  model: GuestModel,
  diverged: () => boolean,
  soundQemu: boolean,
): Promise<void> {
  const fmt = spec.format;
  const fq = await managedFacts(s, fmt, q);
  const fo = await managedFacts(s, fmt, o);
  if (diverged()) return;
  // qimg's actions and writes keep the bitmaps as QEMU's do (flags, granularity; not "in-use").
  if (fq.bitmaps !== fo.bitmaps) {
    s.fail("bitmap:info", `QEMU's twin: ${fq.bitmaps}; qimg's twin: ${fo.bitmaps}`);
  }
  if (fq.snapshots.join(" | ") !== fo.snapshots.join(" | ")) {
    s.fail(
      "snapshot:list",
      `QEMU's twin: ${fq.snapshots.join(" | ") || "(none)"}; qimg's twin: ${fo.snapshots.join(" | ") || "(none)"}`,
    );
  }
  // The model against QEMU's twin (a difference here is the harness's, or both twins' bug).
  if (fq.size === fo.size && fq.size !== model.size) {
    s.fail("model:size", `both twins ${fq.size} bytes, the model ${model.size}`);
  }
  const wantSnaps = model.snapshots.map((x) => `${x.id} ${x.name}`).join(" | ");
  const gotSnaps = fq.snapshots.map((x) => x.replace(/ \d+$/, "")).join(" | ");
  if (wantSnaps !== gotSnaps) {
    s.fail(
      "model:snapshots",
      `QEMU's twin: ${gotSnaps || "(none)"}; the model: ${wantSnaps || "(none)"}`,
    );
  }
  const wantBitmaps = [...model.bitmaps]
    .map(([n, b]) => `${n}:${b.granularity}:${b.enabled ? "auto" : "-"}`)
    .sort()
    .join(" ");
  const gotBitmaps = fq.bitmapList
    .map((b) => `${b.name}:${b.granularity}:${b.flags.includes("auto") ? "auto" : "-"}`)
    .sort()
    .join(" ");
  if (spec.crash !== true && wantBitmaps !== gotBitmaps) {
    s.fail(
      "model:bitmaps",
      `QEMU's twin: ${gotBitmaps || "(none)"}; the model: ${wantBitmaps || "(none)"}`,
    );
  }

  if (soundQemu) {
    // Internal snapshots keep what they saw: qimg's writes after them copied shared clusters,
    // its applies and deletes left the others alone. qemu-img reads a snapshot through the
    // active disk's size: the first min(snapshot's size, active size) bytes are compared.
    for (const line of fq.snapshots) {
      const id = line.split(" ")[0] ?? "";
      const sn = model.snapshots.find((x) => x.id === id);
      if (sn === undefined) continue;
      const dump = (img: string): Promise<Outcome> =>
        s.qemuImg([
          "convert",
          "-f",
          fmt,
          "-l",
          `snapshot.id=${id}`,
          "-O",
          "raw",
          img,
          `${img}.${id}.raw`,
        ]);
      const rq = await dump(q);
      const ro = await dump(o);
      if (rq.code !== 0) continue;
      if (ro.code !== 0) {
        s.fail("snapshot:unreadable", firstLines(ro.stderr));
        continue;
      }
      const length = Math.min(sn.bytes.length, model.size);
      truncateSync(`${q}.${id}.raw`, length);
      truncateSync(`${o}.${id}.raw`, length);
      const before = s.failures.length;
      await compareImages(
        s,
        "snapshot",
        { file: `${q}.${id}.raw`, format: "raw" },
        { file: `${o}.${id}.raw`, format: "raw" },
      );
      const f = s.failures[before];
      if (f !== undefined) {
        const held = (file: string): number =>
          firstMismatchOf(
            sn.bytes.subarray(0, length),
            sn.known.subarray(0, length),
            readFileSync(file),
          );
        const [mq, mo] = [held(`${q}.${id}.raw`), held(`${o}.${id}.raw`)];
        if (mo < 0) {
          s.failures.splice(before, 1);
          s.notes.push(
            mq < 0
              ? `snapshot ${id}: twins differ only where the outcome is open (${f.detail})`
              : `snapshot ${id}: QEMU's departs from the model at ${mq}; qimg's agrees (${f.detail})`,
          );
        } else {
          s.failures[before] = {
            category: f.category,
            detail: `snapshot ${id} ${sn.name}: ${f.detail} (model: qimg's first wrong byte ${mo}, QEMU's ${mq}; -1 = agrees)`,
          };
        }
      }
    }
  }

  // The dirty bits themselves, read from the files.
  const dq = bitmapDirty(q);
  const dd = bitmapDirty(o);
  for (const [name, bq] of dq) {
    const bo = dd.get(name);
    const [tq, to] = [runsText(bq.bits), bo === undefined ? "(missing)" : runsText(bo.bits)];
    const m = model.bitmaps.get(name);
    // (after a crash QEMU's bitmaps are in use: the model does not say what they hold)
    const judge = spec.crash !== true && m !== undefined;
    const mq = judge ? firstBitMismatch(m, bq.bits) : -1;
    const mo = judge && bo !== undefined ? firstBitMismatch(m, bo.bits) : -1;
    if (tq !== to) {
      if (judge && bo !== undefined && mo < 0 && mq >= 0) {
        s.notes.push(
          `bitmap ${name}: QEMU's departs from the model at granule ${mq}; qimg's agrees`,
        );
      } else {
        s.fail(
          "bitmap:dirty-bits",
          `${name}: QEMU's twin dirty ${tq}; qimg's twin dirty ${to}${judge ? ` (model: qimg's first wrong granule ${mo}, QEMU's ${mq}; -1 = agrees)` : ""}`,
        );
      }
    } else if (mq >= 0) {
      s.fail(
        "model:bitmap-bits",
        `${name}: both twins dirty ${tq}; the model differs at granule ${mq}`,
      );
    }
  }
}

export async function runCase(spec: CaseSpec, root: string, keep = false): Promise<CaseResult> {
  const dir = join(root, `case-${spec.seed}-${Math.random().toString(36).slice(2, 8)}`);
  mkdirSync(dir, { recursive: true });
  const s = new Session(dir);
  let skipped: string | false = false;
  try {
    skipped = await runIn(s, spec);
  } catch (e) {
    s.fail("harness-error", e instanceof Error ? (e.stack ?? e.message) : String(e));
  } finally {
    if (!keep) rmSync(dir, { recursive: true, force: true });
  }
  return {
    spec,
    skipped: skipped !== false,
    skipReason: skipped === false ? undefined : skipped,
    failures: s.failures,
    notes: s.notes,
    repro: s.repro(),
  };
}

async function runIn(s: Session, spec: CaseSpec): Promise<string | false> {
  const fmt = spec.format;
  const backing = await makeBacking(s, spec);
  const q = s.path(`q.${fmt}`);
  const o = s.path(`o.${fmt}`);
  const createArgs = (file: string, data: string): string[] => {
    const opts = [...spec.options];
    if (spec.dataFile) opts.push(`data_file=${data}`);
    const a = ["create", "-q", "-f", fmt];
    if (backing !== undefined) a.push("-b", backing.file, "-F", backing.format);
    if (opts.length > 0) a.push("-o", opts.join(","));
    a.push(file);
    if (spec.size !== undefined) a.push(String(spec.size));
    return a;
  };
  const qc = await s.qemuImg(createArgs(q, s.path("q.data")));
  const oc = await s.qimg(createArgs(o, s.path("o.data")), "create");
  if (oc.code !== 0) {
    // A refused create leaves nothing behind (no image; no data file that QEMU would not leave).
    if (existsSync(o)) s.fail("create:refused-left-file", `${o} exists after a refused create`);
    if (spec.dataFile && existsSync(s.path("o.data")) && !existsSync(s.path("q.data"))) {
      s.fail("create:refused-left-data-file", "o.data exists after a refused create");
    }
  }
  if (qc.code !== 0) {
    if (oc.code === 0)
      s.fail("create:qimg-accepts-what-qemu-refuses", `qemu-img: ${firstLines(qc.stderr)}`);
    return firstLines(qc.stderr, 1).replace(/^qemu-img: [^:]*: /, "");
  }
  if (oc.code !== 0) {
    s.fail("create:qimg-refuses", firstLines(oc.stderr));
    return false;
  }
  if (fmt === "qed") {
    // qemu-img 7.2 makes QED images it cannot open itself (table_size=1 with large clusters:
    // "QED table offset is invalid"): no oracle for those.
    const r = await s.qemuImg(["check", "-f", "qed", q]);
    if (/Could not open/.test(r.stderr))
      return `QEMU cannot open its own image: ${firstLines(r.stderr, 1).replace(/^.*: /, "")}`;
  }
  for (const b of spec.bitmaps) {
    const add = (file: string): string[] => [
      "bitmap",
      "--add",
      "-g",
      String(b.granularity),
      file,
      b.name,
    ];
    const r = await s.qemuImg(add(q));
    if (r.code !== 0) throw new Error(`qemu-img bitmap --add on QEMU's twin: ${r.stderr}`);
    const r2 = await s.qemuImg(add(o));
    if (r2.code !== 0) s.fail("bitmap:qemu-cannot-add-to-qimg-image", firstLines(r2.stderr));
  }
  const qImg = { file: q, format: fmt };
  const oImg = { file: o, format: fmt };

  const model = new GuestModel(
    roundSector(spec.size ?? spec.backing?.size ?? 0),
    spec.backing === undefined ? undefined : backingBytes(spec.backing),
  );
  for (const b of spec.bitmaps) {
    model.apply({ k: "bitmap", act: "add", name: b.name, granularity: b.granularity });
  }
  let oracleLost = false;
  const diverged = (): boolean =>
    oracleLost || s.failures.some((f) => /^(op|resize):/.test(f.category));
  // Operations: runs of qemu-io commands between resizes.
  let segment: Op[] = [];
  let index = 0;
  const flushSegment = async (last = false): Promise<void> => {
    const crash = last && spec.crash === true;
    if (segment.length === 0 && !crash) return;
    const cmds = [...ioCommands(segment), ...(crash ? ["-c", "abort"] : [])];
    const qr = await s.qemuIo(["-f", fmt, ...cmds, q], crash);
    // A crash leaves the image open: run qimg as its own process then, so that nothing of the
    // crashed run stays behind in this one.
    const or = crash
      ? await s.qimgProcess(["io", "-f", fmt, ...cmds, o])
      : await s.qimg(["io", "-f", fmt, ...cmds, o], "io");
    if ((!crash && qr.code >= 128) || /Assertion .* failed/.test(qr.stderr)) {
      // qemu-io itself crashed (e.g. 7.2's QED assertion `s->allocating_acb == NULL' with
      // concurrent allocating writes): no oracle for the rest of the case.
      s.notes.push(`qemu-io crashed (exit ${qr.code}): ${firstLines(qr.stderr, 1)}`);
      oracleLost = true;
    }
    if (/Marking image as corrupt/.test(qr.stderr)) {
      // QEMU found its own image corrupt mid-run (its compressed-write packing bug): no oracle.
      s.notes.push(`qemu-io marked QEMU's own image corrupt: ${firstLines(qr.stderr, 1)}`);
      oracleLost = true;
    }
    const qo = opOutputs(segment, qr.stdout);
    const oo = opOutputs(segment, or.stdout);
    const qs = qo.map((x) => x.ok);
    const os = oo.map((x) => x.ok);
    segment.forEach((op, i) => {
      if (qs[i] === true) model.apply(op);
      else model.failed(op);
    });
    for (let i = 0; i < segment.length; i++) {
      // Once one side ran an operation the other refused, later statuses follow from that.
      if (qs[i] !== os[i] && !diverged()) {
        const op = segment[i] as Op;
        s.fail(
          `op:${op.k}:${qs[i] === true ? "qimg-refuses" : "qimg-accepts"}`,
          `#${index - segment.length + i} '${ioCommand(op)}': qemu-io ${qs[i] === true ? "ok" : "refused"}, qimg ${os[i] === true ? "ok" : "refused"}; qimg said: ${oo[i]?.text ?? ""} ${firstLines(or.stderr, 2)}; qemu-io said: ${qo[i]?.text ?? ""}`,
        );
      }
    }
    const qFailed = qs.includes(false);
    if ((qr.code !== 0) !== (or.code !== 0) && !diverged()) {
      s.fail(
        "op:exit-status",
        `qemu-io exit ${qr.code}, qimg io exit ${or.code} (qemu-io refused some: ${qFailed})`,
      );
    }
    segment = [];
  };
  for (const op of spec.ops) {
    index++;
    if (op.k === "snapshot" || op.k === "bitmap") {
      await flushSegment();
      await runAction(s, op, q, o, model, diverged);
      continue;
    }
    if (op.k !== "resize") {
      segment.push(op);
      continue;
    }
    await flushSegment();
    const qr = await s.qemuImg(["resize", "-q", "-f", fmt, q, `+${op.delta}`]);
    const or = await s.qimg(["resize", "-q", "-f", fmt, o, `+${op.delta}`], "resize");
    if (qr.code === 0) model.apply(op);
    if ((qr.code === 0) !== (or.code === 0) && !diverged()) {
      s.fail(
        `resize:${qr.code === 0 ? "qimg-refuses" : "qimg-accepts"}`,
        `+${op.delta}: qemu-img exit ${qr.code} (${firstLines(qr.stderr)}), qimg exit ${or.code} (${firstLines(or.stderr)})`,
      );
    }
  }
  await flushSegment(true);
  if (spec.crash === true && !diverged()) {
    // After the crash both images hold every write (writethrough, qemu-io's default); the
    // checkers' verdicts agree (e.g. lazy refcounts: stale refcounts, dirty bit); QEMU's repair
    // makes both clean, and the comparisons below run on the repaired twins.
    // qimg's crash image may be cleaner than QEMU's (QEMU leaks clusters a crash interrupts),
    // never worse — except that with lazy refcounts stale refcounts are expected when the dirty
    // flag says so (QEMU itself keeps compressed writes' refcounts exact, and 7.2 even loses
    // such writes at abort: the model notes that).
    const cq = await s.qemuImg(["check", "-f", fmt, q]);
    const co = await s.qemuImg(["check", "-f", fmt, o]);
    const severity = (code: number): number => (code === 0 ? 0 : code === 3 ? 1 : 2);
    const dirtyFlag = async (f: string): Promise<unknown> => {
      const r = await s.qemuImg(["info", "-f", fmt, "--output=json", f]);
      return (JSON.parse(r.stdout || "{}") as Record<string, unknown>)["dirty-flag"];
    };
    const lazy = spec.options.includes("lazy_refcounts=on");
    const explained = lazy && (await dirtyFlag(o)) === true;
    if (severity(co.code) > severity(cq.code) && !explained) {
      s.fail(
        "crash:check-verdict",
        `after abort qemu-img check exits ${cq.code} on QEMU's twin, ${co.code} on qimg's: ${firstLines(co.stdout + co.stderr, 4)}`,
      );
    }
    for (const f of [q, o]) await s.qemuImg(["check", "-r", "all", "-f", fmt, f]);
  }

  // After an operation that only one side ran, the twins differ by design: compare no further.
  const twinCheck = await checkBoth(s, "twins", o, q, fmt);
  // (leaks on QEMU's side do not stop the comparison; corruption does)
  const qemuBroken = s.notes.some(
    (n) => n.startsWith("qemu-img check also fails") && n.includes("(exit 2)"),
  );
  if (!diverged() && !qemuBroken) {
    const before = s.failures.length;
    await compareImages(s, "twins", qImg, oImg);
    if (s.failures.length > before) await arbitrate(s, model, qImg, oImg, before);
    else if (process.env.QIMG_DIFF_MODEL === "1" && spec.crash !== true) {
      // The model against QEMU's twin even when the twins agree (a check of the harness).
      const out = `${q}.model.raw`;
      const r = await s.qemuImg(["convert", "-f", fmt, "-O", "raw", q, out]);
      const at = r.code === 0 ? model.firstMismatch(readFileSync(out)) : -1;
      if (at >= 0) s.fail("model:guest", `both twins differ from the model at byte ${at}`);
    }
  }
  // Snapshot contents and compression are compared only where QEMU's twin is sound (after a
  // crash it may be unreadable: long seed 40380).
  const sound = !qemuBroken && !s.notes.some((n) => /departs from|unreadable/.test(n));
  const managed =
    spec.bitmaps.length > 0 || spec.ops.some((op) => op.k === "snapshot" || op.k === "bitmap");
  if (managed) await compareManaged(s, spec, q, o, model, diverged, sound);
  if (!diverged() && sound && spec.ops.some((op) => op.k === "wc")) {
    await compareCompression(s, "twins", twinCheck, q, fmt);
  }
  if (spec.dataFile && spec.options.includes("data_file_raw=on")) {
    // The raw data file must equal the guest disk: compare qimg's image, as qemu-img reads it,
    // with its raw data file (the twins' guest bytes are compared above; comparing QEMU's image
    // here failed where QEMU's own image was the wrong one, seed 20262772).
    // (The data file may be shorter than the disk: the size is not compared.)
    const r = await s.qemuImg(["compare", "-f", fmt, "-F", "raw", o, s.path("o.data")]);
    if (r.code !== 0 && !diverged())
      s.fail("data-file-raw:content", firstLines(r.stdout + r.stderr));
  }

  let n = 0;
  for (const c of spec.converts) {
    n++;
    const label = convertLabel(c);
    const cq = s.path(`cq${n}.${c.format}`);
    const co = s.path(`co${n}.${c.format}`);
    const opts = [...c.options];
    if (c.keepBacking && backing !== undefined)
      opts.push(`backing_file=${backing.file}`, `backing_fmt=${backing.format}`);
    const args = (target: string): string[] => [
      "convert",
      "-f",
      fmt,
      "-O",
      c.format,
      ...(c.compress ? ["-c"] : []),
      ...(opts.length > 0 ? ["-o", opts.join(",")] : []),
      q,
      target,
    ];
    const qr = await s.qemuImg(args(cq));
    const or = await s.qimg(args(co), `convert-${label}`);
    if ((qr.code === 0) !== (or.code === 0)) {
      s.fail(
        `convert:${label}:${qr.code === 0 ? "qimg-refuses" : "qimg-accepts"}`,
        `qemu-img exit ${qr.code} (${firstLines(qr.stderr)}), qimg exit ${or.code} (${firstLines(or.stderr)})`,
      );
      continue;
    }
    if (qr.code !== 0) continue;
    // Same guest bytes as the source, and the same virtual size as qemu-img's output.
    await compareImages(s, `convert:${label}:vs-source`, { file: co, format: c.format }, qImg);
    await compareImages(
      s,
      `convert:${label}:vs-qemu-output`,
      { file: co, format: c.format },
      { file: cq, format: c.format },
    );
    const convertCheck = await checkBoth(s, `convert:${label}`, co, undefined, c.format);
    if (c.compress) await compareCompression(s, `convert:${label}`, convertCheck, cq, c.format);
  }
  return false;
}

/**
 * The dirty ranges of every persistent bitmap of a qcow2 file, as text ("[first,last] ..." in
 * bitmap granules), read straight from the bytes (header extension 0x23852875, bitmap directory,
 * bitmap tables): an independent reader, so that it judges QEMU's and qimg's images alike.
 */
export function bitmapBits(file: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const [name, b] of bitmapDirty(file)) out.set(name, runsText(b.bits));
  return out;
}

/** Dirty granules (1 = dirty) as "[first,last] ..." runs, "(clean)" when none. */
function runsText(bits: Uint8Array): string {
  const runs: string[] = [];
  let start = -1;
  for (let g = 0; g <= bits.length; g++) {
    const bit = g < bits.length && bits[g] === 1;
    if (bit && start < 0) start = g;
    if (!bit && start >= 0) {
      runs.push(`[${start},${g - 1}]`);
      start = -1;
    }
  }
  return runs.join(" ") || "(clean)";
}

/** A persistent bitmap as stored in the file. */
export interface StoredBitmap {
  readonly granularity: number;
  /** The "auto" flag (enabled: writes mark it). */
  readonly enabled: boolean;
  readonly inUse: boolean;
  /** One byte per granule of the disk: 1 dirty, 0 clean. */
  readonly bits: Uint8Array;
}

/** Every persistent bitmap of a qcow2 file by name, read from the bytes (see bitmapBits). */
export function bitmapDirty(file: string): Map<string, StoredBitmap> {
  const buf = readFileSync(file);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const u64 = (o: number): number => Number(dv.getBigUint64(o, false));
  const out = new Map<string, StoredBitmap>();
  const cluster = 2 ** dv.getUint32(20, false);
  const size = u64(24);
  const headerLength = dv.getUint32(4, false) >= 3 ? dv.getUint32(100, false) : 72;
  let at = headerLength;
  let dirOffset = -1;
  let dirSize = 0;
  let count = 0;
  while (at + 8 <= buf.length) {
    const type = dv.getUint32(at, false);
    const len = dv.getUint32(at + 4, false);
    if (type === 0) break;
    if (type === 0x23852875) {
      count = dv.getUint32(at + 8, false);
      dirSize = u64(at + 16);
      dirOffset = u64(at + 24);
    }
    at += 8 + Math.ceil(len / 8) * 8;
  }
  if (dirOffset < 0) return out;
  let e = dirOffset;
  for (let i = 0; i < count && e < dirOffset + dirSize; i++) {
    const table = u64(e);
    const tableSize = dv.getUint32(e + 8, false);
    const flags = dv.getUint32(e + 12, false);
    const granularity = 2 ** dv.getUint8(e + 17);
    const nameSize = dv.getUint16(e + 18, false);
    const extra = dv.getUint32(e + 20, false);
    const name = buf.subarray(e + 24 + extra, e + 24 + extra + nameSize).toString("utf8");
    e += Math.ceil((24 + extra + nameSize) / 8) * 8;
    const granules = Math.ceil(size / granularity);
    const perCluster = cluster * 8;
    const bits = new Uint8Array(granules);
    for (let g = 0; g < granules; g++) {
      const index = Math.floor(g / perCluster);
      if (index >= tableSize) break;
      const entry = u64(table + index * 8);
      const off = Number(BigInt(entry) & 0x00fffffffffffe00n);
      const within = g % perCluster;
      const bit =
        off === 0 ? entry % 2 === 1 : (((buf[off + (within >> 3)] ?? 0) >> (within & 7)) & 1) === 1;
      bits[g] = bit ? 1 : 0;
    }
    out.set(name, { granularity, enabled: (flags & 2) !== 0, inUse: (flags & 1) !== 0, bits });
  }
  return out;
}

/**
 * The twins differ: read both guest disks and hold them against the model. When qimg's agrees
 * and QEMU's does not, QEMU is wrong: the failure becomes a note.
 */
async function arbitrate(
  s: Session,
  model: GuestModel,
  q: { file: string; format: AnyFormat },
  o: { file: string; format: AnyFormat },
  failureIndex: number,
): Promise<void> {
  const dump = async (img: { file: string; format: AnyFormat }): Promise<Uint8Array> => {
    const out = `${img.file}.dump.raw`;
    const r = await s.qemuImg(["convert", "-f", img.format, "-O", "raw", img.file, out]);
    if (r.code !== 0) throw new Error(`qemu-img convert ${img.file}: ${r.stderr}`);
    return readFileSync(out);
  };
  const f = s.failures[failureIndex];
  if (f === undefined) return;
  let qBytes: Uint8Array;
  try {
    qBytes = await dump(q);
  } catch (e) {
    // QEMU cannot read its own twin any more (e.g. after its repair of a crashed image).
    s.failures.splice(failureIndex, 1);
    s.notes.push(
      `QEMU's twin unreadable by qemu-img: ${e instanceof Error ? e.message : String(e)}`,
    );
    return;
  }
  const mq = model.firstMismatch(qBytes);
  const mo = model.firstMismatch(await dump(o));
  if (mo < 0 && mq >= 0) {
    s.failures.splice(failureIndex, 1);
    s.notes.push(`QEMU's image departs from the model at ${mq}; qimg's agrees (${f.detail})`);
  } else if (mo < 0 && mq < 0) {
    // Both are within what the operations allow: they differ only where a discard or a
    // failed request left the outcome open.
    s.failures.splice(failureIndex, 1);
    s.notes.push(`twins differ only where the outcome is open (${f.detail})`);
  } else {
    s.failures[failureIndex] = {
      category: f.category,
      detail: `${f.detail} (model: qimg's first wrong byte ${mo}, QEMU's ${mq}; -1 = agrees)`,
    };
  }
}

/** Drop operations and conversions one at a time while a failure of the same category remains. */
export async function shrink(
  result: CaseResult,
  root: string,
  category: string,
  budget = 60,
): Promise<CaseResult> {
  let best = result;
  let runs = 0;
  const stillFails = (r: CaseResult): boolean => r.failures.some((f) => f.category === category);
  let progress = true;
  while (progress && runs < budget) {
    progress = false;
    const spec = best.spec;
    const candidates: CaseSpec[] = [];
    if (spec.bitmaps.length > 0) candidates.push({ ...spec, bitmaps: [] });
    if (spec.bitmaps.length > 1) {
      for (let i = 0; i < spec.bitmaps.length; i++)
        candidates.push({ ...spec, bitmaps: spec.bitmaps.filter((_, j) => j !== i) });
    }
    for (let i = 0; i < spec.converts.length; i++)
      candidates.push({ ...spec, converts: spec.converts.filter((_, j) => j !== i) });
    for (let i = 0; i < spec.ops.length; i++)
      candidates.push({ ...spec, ops: spec.ops.filter((_, j) => j !== i) });
    for (const cand of candidates) {
      if (runs >= budget) break;
      runs++;
      const r = await runCase(cand, root);
      if (stillFails(r)) {
        best = r;
        progress = true;
        break;
      }
    }
  }
  return best;
}

/** Report text of one failing case: seed, options, minimal sequence and the commands. */
export function formatFailure(r: CaseResult, category: string): string {
  const f = r.failures.find((x) => x.category === category) ?? r.failures[0];
  const spec = r.spec;
  const b = spec.backing;
  return [
    `seed ${spec.seed}: ${category}`,
    `  ${f?.detail ?? ""}`,
    `  format=${spec.format} options=${spec.options.join(",") || "-"}${spec.dataFile ? " +data_file" : ""} size=${spec.size ?? "(backing's)"}${b ? ` backing=${b.format}:${b.size}` : ""}`,
    `  ops: ${spec.ops.map(ioCommand).join(" ; ") || "(none)"}`,
    `  converts: ${spec.converts.map(convertLabel).join(" ") || "(none)"}${spec.crash === true ? "; the last io run ends with abort" : ""}`,
    ...(spec.bitmaps.length > 0
      ? [`  bitmaps: ${spec.bitmaps.map((b) => `${b.name} -g ${b.granularity}`).join(", ")}`]
      : []),
    "  repro (in an empty directory; base.raw holds the backing's random bytes):",
    ...r.repro.split("\n").map((l) => `    ${l}`),
  ].join("\n");
}

/** Run cases with `concurrency` at a time. */
export async function runPool<T, R>(
  items: readonly T[],
  concurrency: number,
  fn: (t: T) => Promise<R>,
): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i] as T);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
  return out;
}
