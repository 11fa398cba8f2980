/**
 * vitest global setup: packs and installs the tarballs once for all test files, and removes
 * the stranger's folder afterwards (kept when QIMG_KEEP_STRANGER=1, for debugging).
 */
import { rmSync } from "node:fs";
import { dirname } from "node:path";
import type { TestProject } from "vitest/node";
import { prepareStranger, type Stranger } from "./stranger.js";

declare module "vitest" {
  export interface ProvidedContext {
    stranger: Stranger;
  }
}

export default function setup(project: TestProject): () => void {
  const started = Date.now();
  const stranger = prepareStranger();
  console.log(
    `packed ${stranger.packages.length} packages and installed them in ${stranger.dir} ` +
      `(${((Date.now() - started) / 1000).toFixed(1)} s)`,
  );
  project.provide("stranger", stranger);
  return () => {
    if (process.env.QIMG_KEEP_STRANGER !== "1") {
      rmSync(dirname(stranger.dir), { recursive: true, force: true });
    }
  };
}
