import { describe, expect, it } from "vitest";
import { strtolWhole } from "./cvtnum.js";
import { parseImageOpts } from "./image-opts.js";

describe("parseImageOpts", () => {
  it("reads driver= and file.filename= (and ,, as a comma)", () => {
    expect(parseImageOpts("driver=qcow2,file.filename=a,,b.img")).toEqual({
      filename: "a,b.img",
      driver: "qcow2",
    });
    expect(parseImageOpts("file.driver=file,file.filename=x")).toEqual({
      filename: "x",
      driver: undefined,
    });
  });

  it("words errors as qemu-img", () => {
    expect(() => parseImageOpts("x.img")).toThrow(
      "Could not open 'x.img': Cannot find device='x.img' nor node-name='x.img'",
    );
    expect(() => parseImageOpts("driver=qcow2")).toThrow(
      `Could not open 'driver=qcow2': A block device must be specified for "file"`,
    );
    expect(() => parseImageOpts("driver=qcow2,file.filename=a,foo=1")).toThrow(
      "Block format 'qcow2' does not support the option 'foo'",
    );
  });
});

describe("strtolWhole", () => {
  it("reads numbers as C's strtol with base 0 over the whole text", () => {
    expect(strtolWhole("4")).toBe(4);
    expect(strtolWhole(" +4")).toBe(4);
    expect(strtolWhole("0x10")).toBe(16);
    expect(strtolWhole("010")).toBe(8);
    expect(strtolWhole("-3")).toBe(-3);
    for (const bad of ["08", "4k", "1.5", "4 ", "", "abc"])
      expect(strtolWhole(bad)).toBeUndefined();
  });
});
