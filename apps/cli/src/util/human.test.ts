import { describe, expect, it } from "vitest";
import { formatG3, sizeToStr } from "./human.js";
import { dumpQObject, toQemuJson } from "./qjson.js";

describe("sizeToStr (qemu's size_to_str)", () => {
  it.each([
    [0, "0 B"],
    [512, "512 B"],
    [999, "999 B"],
    [1000, "0.977 KiB"],
    [1024, "1 KiB"],
    [69632, "68 KiB"],
    [155648, "152 KiB"],
    [1069056, "1.02 MiB"],
    [1572864, "1.5 MiB"],
    [4194304, "4 MiB"],
    [1179648, "1.12 MiB"], // 1.125: glibc rounds ties to even
    [10 * 1024 ** 3, "10 GiB"],
  ])("%d -> %s", (n, want) => {
    expect(sizeToStr(n)).toBe(want);
  });

  it("formatG3 switches to exponent form like %g", () => {
    expect(formatG3(999.6)).toBe("1e+03");
    expect(formatG3(0.5)).toBe("0.5");
  });
});

describe("QEMU JSON printer", () => {
  it("prints empty containers open and nests by four spaces", () => {
    expect(toQemuJson({ a: [], b: { c: 1 }, d: undefined })).toBe(
      '{\n    "a": [\n    ],\n    "b": {\n        "c": 1\n    }\n}',
    );
  });

  it("dumps QObjects like qemu's dump_qobject", () => {
    const out = dumpQObject(
      { "lazy-refcounts": false, bitmaps: [{ flags: ["auto"], name: "b0" }, { flags: [] }] },
      1,
    );
    expect(out).toBe(
      "    lazy refcounts: false\n    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: b0\n        [1]:\n            flags:\n",
    );
  });
});
