import { describe, expect, it } from "vitest";
import { checkExitCode, formatCheckHuman, toQemuJson } from "./index.js";
import type { CheckResult } from "./index.js";

const base: CheckResult = {
  filename: "disk.qcow2",
  format: "qcow2",
  checkErrors: 0,
  corruptions: 0,
  leaks: 0,
  corruptionsFixed: 0,
  leaksFixed: 0,
  imageEndOffset: 393216,
  totalClusters: 32,
  allocatedClusters: 1,
  fragmentedClusters: 0,
  compressedClusters: 0,
  messages: [],
  lostRanges: [],
  rebuilt: false,
  exitCode: 0,
};

describe("toQemuJson", () => {
  it("omits zero counters and keeps qemu-img's key order", () => {
    expect(
      Object.keys(toQemuJson({ ...base, leaks: 2, corruptionsFixed: 1, compressedClusters: 1 })!),
    ).toEqual([
      "image-end-offset",
      "compressed-clusters",
      "total-clusters",
      "corruptions-fixed",
      "check-errors",
      "leaks",
      "allocated-clusters",
      "filename",
      "format",
    ]);
  });
  it("prints nothing when the check failed", () => {
    expect(toQemuJson({ ...base, failure: "Input/output error" })).toBeUndefined();
  });
});

describe("formatCheckHuman", () => {
  it("rounds exact ties to even like printf (1/32 = 3.12%)", () => {
    expect(formatCheckHuman(base).stdout).toBe(
      "No errors were found on the image.\n1/32 = 3.12% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 393216\n",
    );
  });
  it("prints the repair report, errors and leaks", () => {
    const r = { ...base, corruptions: 2, leaks: 1, repaired: { leaks: 3, corruptions: 4 } };
    expect(formatCheckHuman(r).stdout).toBe(
      "The following inconsistencies were found and repaired:\n\n    3 leaked clusters\n    4 corruptions\n\n" +
        "Double checking the fixed image now...\n" +
        "\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n" +
        "\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n" +
        "1/32 = 3.12% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 393216\n",
    );
  });
});

describe("checkExitCode", () => {
  it("maps like qemu-img", () => {
    expect(checkExitCode(base)).toBe(0);
    expect(checkExitCode({ ...base, leaks: 1 })).toBe(3);
    expect(checkExitCode({ ...base, leaks: 1, corruptions: 1 })).toBe(2);
    expect(checkExitCode({ ...base, checkErrors: 1, corruptions: 1 })).toBe(1);
    expect(checkExitCode({ ...base, failure: "x" })).toBe(1);
  });
});
