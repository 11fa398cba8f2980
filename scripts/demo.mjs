// The README's first command: unpack a bundled fixture (a qcow2 image with a backing file,
// made by real qemu-img) and run `qimg info`, `qimg map` and `qimg check` on it.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";

const root = path.resolve(import.meta.dirname, "..");
const src = path.join(root, "packages/fixtures/images/qcow2-mixed");
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-demo-"));
for (const f of fs.readdirSync(src)) {
  fs.writeFileSync(
    path.join(dir, f.replace(/\.gz$/, "")),
    zlib.gunzipSync(fs.readFileSync(path.join(src, f))),
  );
}
const qimg = path.join(root, "apps/cli/dist/qimg.cjs");
const image = path.join(dir, "top.qcow2");
for (const args of [
  ["info", "--backing-chain", image],
  ["map", "--output=json", image],
  ["check", image],
]) {
  console.log(`$ qimg ${args.join(" ")}`);
  console.log(execFileSync(process.execPath, [qimg, ...args], { encoding: "utf8" }));
}
