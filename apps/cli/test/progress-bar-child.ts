/**
 * Run by progress.test.ts inside a pseudo-terminal (`script`): draws the `-p` bar on the real
 * stdout, says READY with its pid, and waits to be interrupted.
 */
import { processContext } from "../src/context.js";
import { startProgress } from "../src/util/progress.js";

const progress = startProgress(processContext(), true, 100 * 1024 * 1024);
progress.update(42 * 1024 * 1024);
setTimeout(() => process.stdout.write(`\nREADY ${process.pid}\n`), 300);
setInterval(() => progress.update(43 * 1024 * 1024), 1000);
