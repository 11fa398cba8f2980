import {
  CorruptImageError,
  ErrorCode,
  FormatError,
  InvalidArgumentError,
  IoError,
  UnsupportedFeatureError,
} from "@qimg/structs";
import { describe, expect, it } from "vitest";
import { captureContext } from "./context.js";
import {
  CliError,
  describeError,
  FileContextError,
  inFile,
  reportError,
  requestErrorText,
} from "./errors.js";

describe("error reporting", () => {
  it("prints a qimg error as one line naming the file, exit code from the command", async () => {
    const ctx = captureContext();
    const err = await inFile("a.qcow2", () =>
      Promise.reject(
        new CorruptImageError("L1 table at 0x30200 is not aligned to the cluster size 65536"),
      ),
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FileContextError);
    expect(reportError(err, ctx, 1)).toBe(1);
    expect(ctx.out.stderr).toBe(
      "qimg: a.qcow2: L1 table at 0x30200 is not aligned to the cluster size 65536\n",
    );
  });

  it("strips a repeated file prefix and uses strerror words for open failures", () => {
    const cause = Object.assign(new Error("ENOENT: no such file or directory, stat 'x'"), {
      code: "ENOENT",
    });
    const d = describeError(
      new FileContextError(
        "x",
        new IoError("x: open failed: ENOENT: no such file or directory", { cause }),
      ),
    );
    expect(d.line).toBe("qimg: x: No such file or directory");
    expect(d.internal).toBe(false);
  });

  it("uses the error's own exit code when it has one", () => {
    const ctx = captureContext();
    expect(reportError(new CliError("bad", { exitCode: 4 }), ctx, 2)).toBe(4);
    expect(
      reportError(new FileContextError("f", new UnsupportedFeatureError("nope", ["x"]), 2), ctx, 1),
    ).toBe(2);
    expect(ctx.out.stderr).toBe("qimg: bad\nqimg: f: nope\n");
  });

  it("prints one line for internal errors too; stacks only with --debug", () => {
    const ctx = captureContext();
    expect(reportError(new TypeError("x is undefined"), ctx, 1)).toBe(1);
    expect(ctx.out.stderr).toBe(
      "qimg: internal error: x is undefined (please report it; --debug prints the details)\n",
    );

    const debugInternal = captureContext({ debug: true });
    reportError(new TypeError("x is undefined"), debugInternal, 1);
    expect(debugInternal.out.stderr.split("\n")[1]).toMatch(/^TypeError: x is undefined/);

    const quiet = captureContext();
    reportError(new CliError("plain"), quiet, 1);
    expect(quiet.out.stderr).toBe("qimg: plain\n");

    const debug = captureContext({ debug: true });
    reportError(new CliError("plain"), debug, 1);
    expect(debug.out.stderr.split("\n").length).toBeGreaterThan(2);
  });
});

describe("requestErrorText: qemu-io's words for a failed request, by code", () => {
  it("maps the error family's codes and system errnos to strerror words, else the message", () => {
    const sys = Object.assign(new Error("ENOSPC: no space left on device, write"), {
      code: "ENOSPC",
    });
    const cases: [unknown, string][] = [
      [
        new IoError("x: image is opened read-only", { code: ErrorCode.READ_ONLY }),
        "Operation not permitted",
      ],
      [
        new InvalidArgumentError(
          "compressed writes must cover exactly one whole cluster (65536 bytes)",
        ),
        "Invalid argument",
      ],
      [
        new CorruptImageError("L2 table offset 0x40200 in L1 entry 0 is not aligned"),
        "Input/output error",
      ],
      [
        new IoError("x: write of 512 bytes at offset 0 failed: ENOSPC: no space", { cause: sys }),
        "No space left on device",
      ],
      [new FileContextError("x", new CorruptImageError("bad")), "Input/output error"],
      [sys, "No space left on device"],
      // The words never come from the message: a message that reads like one keeps its text.
      [
        new FormatError("request is past the end, read-only, invalid request\nsecond line"),
        "request is past the end, read-only, invalid request",
      ],
      [new CliError("Block node is read-only"), "Block node is read-only"],
    ];
    for (const [e, text] of cases) expect(requestErrorText(e)).toBe(text);
  });
});
