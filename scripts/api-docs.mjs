// API documentation: builds it with TypeDoc (typedoc.json: every library's public entries,
// into docs/api) and counts, per package, the public items that have no doc comment. The
// counts may only go down: they are compared with docs/api-undocumented.json, and the run
// fails when a package has more than its recorded count (a new public item without a doc
// comment). `node scripts/api-docs.mjs --update` records lower counts after documenting.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(import.meta.dirname, "..");
const baselineFile = path.join(root, "docs", "api-undocumented.json");
const r = spawnSync(
  process.execPath,
  [path.join(root, "node_modules", "typedoc", "bin", "typedoc")],
  {
    cwd: root,
    encoding: "utf8",
    env: { ...process.env, NO_COLOR: "1", FORCE_COLOR: "0" },
    maxBuffer: 64 << 20,
  },
);
const output = (r.stdout + r.stderr).replace(/\x1b\[[0-9;]*m/g, "");
if (r.status !== 0 || /\[error\]/.test(output)) {
  console.log(output);
  console.log("api docs: TypeDoc failed");
  process.exit(1);
}
const counts = {};
const missing = {};
for (const line of output.split("\n")) {
  const converting = /Converting project at \.\/(\S+)/.exec(line);
  if (converting) {
    const name = JSON.parse(
      fs.readFileSync(path.join(root, converting[1], "package.json"), "utf8"),
    ).name;
    counts[name] = 0;
    missing[name] = [];
    continue;
  }
  const m = /\[warning\] (.*), defined in (@qimg\/[\w-]+)\/.* does not have any documentation/.exec(
    line,
  );
  // Members of an object literal's type (a field table's entries, documented by its `doc`
  // strings) are not items of their own.
  if (m && m[2] in counts && !m[1].includes(".__type.")) {
    counts[m[2]]++;
    missing[m[2]].push(m[1]);
  }
}
const baseline = fs.existsSync(baselineFile)
  ? JSON.parse(fs.readFileSync(baselineFile, "utf8"))
  : {};
if (process.argv.includes("--update")) {
  fs.writeFileSync(baselineFile, JSON.stringify(counts, null, 2) + "\n");
  console.log(`api docs: recorded ${JSON.stringify(counts)}`);
  process.exit(0);
}
let failed = 0;
for (const [pkg, n] of Object.entries(counts)) {
  const allowed = baseline[pkg] ?? 0;
  const verdict = n > allowed ? "MORE than recorded" : n < allowed ? "fewer: run --update" : "ok";
  console.log(`${pkg}: ${n} public items without a doc comment (recorded ${allowed}) ${verdict}`);
  if (n > allowed) {
    failed++;
    for (const item of missing[pkg]) console.log(`  ${item}`);
  }
}
console.log(
  `api docs: html in docs/api; ${failed === 0 ? "no package lost documentation" : `${failed} package(s) gained undocumented public items`}`,
);
process.exit(failed === 0 ? 0 : 1);
