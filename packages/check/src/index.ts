export { checkQcow2 } from "./qcow2.js";
export type { CheckOptions, RepairMode } from "./qcow2.js";
export { checkQedImage } from "./qed.js";
export { checkImage } from "./image.js";
export type { CheckFormat } from "./image.js";
export { checkExitCode, toQemuJson, formatCheckJson, formatCheckHuman } from "./result.js";
export type {
  CheckMessage,
  CheckMessageKind,
  CheckResult,
  LostRange,
  QemuCheckJson,
} from "./result.js";
