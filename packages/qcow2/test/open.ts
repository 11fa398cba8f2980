import path from "node:path";
import { RawImage } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import type { DiskImage } from "@qimg/io";
import { openQcow2 } from "../src/index.js";
import type { BackingOpener, Qcow2OpenOptions } from "../src/index.js";

/** A test opener: resolves names against the overlay's directory, opens qcow2 or raw by format. */
export const openBacking: BackingOpener = async (req) => {
  const file = path.resolve(path.dirname(req.relativeTo), req.filename);
  if (req.chain.includes(file)) throw new Error(`backing chain loop at ${file}`);
  const backend = await FileBackend.open(file, { readOnly: true });
  if (req.format === "qcow2")
    return openQcow2(backend, { openBacking, openDataFile, depth: req.depth, chain: req.chain });
  if (req.format === "raw") return RawImage.open(backend);
  await backend.close();
  throw new Error(`test opener: unsupported backing format ${String(req.format)}`);
};

export const openDataFile = (name: string, relativeTo: string): Promise<FileBackend> =>
  FileBackend.open(path.resolve(path.dirname(relativeTo), name), { readOnly: true });

export async function openFile(
  file: string,
  options: Qcow2OpenOptions = {},
): Promise<DiskImage & Awaited<ReturnType<typeof openQcow2>>> {
  const backend = await FileBackend.open(file, { readOnly: true });
  try {
    return await openQcow2(backend, { openBacking, openDataFile, ...options });
  } catch (e) {
    await backend.close();
    throw e;
  }
}
