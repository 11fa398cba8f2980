import { CorruptImageError, IoError, UnsupportedFeatureError } from "@qimg/structs";
import { describe, expect, it } from "vitest";
import { captureContext } from "./context.js";
import { CliError, describeError, FileContextError, inFile, reportError } from "./errors.js";

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
