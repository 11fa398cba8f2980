import { describe, expect, it } from "vitest";
import { COMMAND_NAMES } from "../src/command-names.js";
import { COMMANDS } from "../src/commands/index.js";

describe("COMMAND_NAMES (the executable's code-cache keys)", () => {
  it("lists exactly the commands the CLI has (add a new command to src/command-names.ts)", () => {
    expect([...COMMAND_NAMES].sort()).toEqual(COMMANDS.map((c) => c.name).sort());
  });
});
