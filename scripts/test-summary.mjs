// Sums the vitest JSON reports every package wrote and prints one closing line:
// "N passed, N failed, N skipped". Exits non-zero when any test failed or none ran.
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(import.meta.dirname, "..");
let passed = 0;
let failed = 0;
let skipped = 0;
const rows = [];
for (const group of ["packages", "apps", "tests"]) {
  for (const dir of fs.readdirSync(path.join(root, group))) {
    const file = path.join(root, group, dir, ".vitest-result.json");
    if (!fs.existsSync(file)) continue;
    const r = JSON.parse(fs.readFileSync(file, "utf8"));
    passed += r.numPassedTests;
    failed += r.numFailedTests;
    skipped += r.numPendingTests + r.numTodoTests;
    rows.push(`${group}/${dir}: ${r.numPassedTests} passed, ${r.numFailedTests} failed`);
  }
}
console.log(rows.join("\n"));
// .ci/run must run exactly the README's test command.
const testCommand = (text) =>
  text
    .split("\n")
    .find((l) => l.includes("run test:all"))
    ?.trim();
const readmeCommand = testCommand(fs.readFileSync(path.join(root, "README.md"), "utf8"));
const ciCommand = testCommand(fs.readFileSync(path.join(root, ".ci/run"), "utf8"));
if (readmeCommand === undefined || readmeCommand !== ciCommand) {
  console.log(`README test command and .ci/run differ:\n  ${readmeCommand}\n  ${ciCommand}`);
  failed++;
}
console.log(`Tests: ${passed} passed, ${failed} failed, ${skipped} skipped`);
if (failed > 0 || passed === 0) process.exit(1);
