/**
 * The packages in a real browser: a page (page/main.ts) bundled with esbuild for the browser
 * from the packages as installed from their tarballs, served over HTTP, driven headless
 * through playwright-core in Debian's Chromium (/usr/bin/chromium). It reads fixture images
 * made by qemu-img from bytes in memory and must find their guest bytes' sha256 from the
 * fixture manifest; it writes new qcow2 images in memory that qemu-img must find clean and
 * equal to the writes; and zstd compression must fail with a clear error, not hang, when
 * zstd-wasm's `zstd.wasm` file is not served — and work when it is.
 *
 * Skips with a printed reason without /usr/bin/chromium, unless QIMG_REQUIRE_BROWSER=1 (CI).
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fixturePath, getFixture, requireQemu } from "@qimg/fixtures";
import { build } from "esbuild";
import { chromium, type BrowserContext, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import type { QimgBrowserTest, WriteResult } from "../page/main.js";
import { patternByte } from "../page/pattern.js";
import { run } from "./stranger.js";

const CHROMIUM = "/usr/bin/chromium";
const hasChromium = existsSync(CHROMIUM);
if (!hasChromium) {
  if (process.env.QIMG_REQUIRE_BROWSER === "1") {
    throw new Error(`${CHROMIUM} is missing but QIMG_REQUIRE_BROWSER=1 (apt-get install chromium)`);
  }
  console.log(`skipping the browser test: ${CHROMIUM} is missing (apt-get install chromium)`);
}
const hasQemu = requireQemu();
if (!hasQemu) console.log("skipping the qemu-img checks of browser-written images: no qemu-img");

const FIXTURES = [
  "qcow2-compressed-zlib",
  "qcow2-compressed-zstd",
  "qcow2-extended-l2",
  "qed-basic",
];

const stranger = inject("stranger");
const work = mkdtempSync(join(tmpdir(), "qimg-browser-"));
let server: Server | undefined;
let origin = "";
let serveWasm = false;
let context: BrowserContext | undefined;

beforeAll(async () => {
  if (!hasChromium) return;
  // The page is bundled from the stranger's project, so its imports resolve to the tarballs.
  const pageDir = join(stranger.dir, "page");
  mkdirSync(pageDir, { recursive: true });
  for (const file of ["main.ts", "pattern.ts"]) {
    const source = readFileSync(new URL(`../page/${file}`, import.meta.url), "utf8");
    writeFileSync(join(pageDir, file), source);
  }
  const www = join(work, "www");
  mkdirSync(www);
  const result = await build({
    entryPoints: [join(pageDir, "main.ts")],
    absWorkingDir: stranger.dir,
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "chrome120",
    outfile: join(www, "bundle.js"),
    logLevel: "silent",
  });
  expect(result.errors).toEqual([]);
  writeFileSync(
    join(www, "index.html"),
    '<!doctype html><html><head><title>qimg</title><script type="module" src="/bundle.js"></script></head><body></body></html>',
  );
  const wasm = readFileSync(
    join(stranger.dir, "node_modules", "@bokuweb", "zstd-wasm", "dist", "web", "zstd.wasm"),
  );
  const files = new Map<string, { body: Buffer; type: string }>([
    ["/", { body: readFileSync(join(www, "index.html")), type: "text/html" }],
    ["/bundle.js", { body: readFileSync(join(www, "bundle.js")), type: "text/javascript" }],
  ]);
  for (const name of FIXTURES) {
    const f = getFixture(name);
    files.set(`/fixtures/${name}`, {
      body: readFileSync(fixturePath(name, f.main)),
      type: "application/octet-stream",
    });
  }
  server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]!;
    const file =
      path === "/zstd.wasm" && serveWasm
        ? { body: wasm, type: "application/wasm" }
        : files.get(path);
    if (file === undefined) {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found");
      return;
    }
    res.writeHead(200, { "content-type": file.type, "cache-control": "no-store" }).end(file.body);
  });
  await new Promise<void>((resolve) => server!.listen(0, "127.0.0.1", resolve));
  origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  context = await chromium.launchPersistentContext(mkdtempSync(join(work, "profile-")), {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

afterAll(async () => {
  await context?.close();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  rmSync(work, { recursive: true, force: true });
});

/** A fresh page with the bundle loaded; `errors` collects uncaught page errors. */
async function openPage(): Promise<{ page: Page; errors: string[] }> {
  const page = await context!.newPage();
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${origin}/`);
  await page.waitForFunction(() => document.title === "qimg ready", undefined, {
    timeout: 30_000,
  });
  return { page, errors };
}

type Api = { qimgBrowserTest: QimgBrowserTest };

/** Check a browser-written image with qemu-img: clean, and equal to the writes replayed. */
function checkWithQemu(name: string, result: WriteResult, seed: number): void {
  const image = join(work, `${name}.qcow2`);
  writeFileSync(image, Buffer.from(result.image, "base64"));
  const expected = new Uint8Array(result.virtualSize);
  result.ops.forEach((op, i) => {
    for (let at = op.offset; at < op.offset + op.length; at++) {
      const b = patternByte(i, at);
      expected[at] = op.kind === "zero" ? 0 : op.kind === "compressed" ? b & 0x0f : b;
    }
  });
  const raw = join(work, `${name}.raw`);
  writeFileSync(raw, expected);
  const why = `seed ${seed} (QIMG_SEED=${seed} replays it)`;
  const check = run("qemu-img", ["check", "--output=json", image]);
  expect(check.stderr, why).toBe("");
  expect(check.code, why).toBe(0);
  const verdict = JSON.parse(check.stdout) as Record<string, unknown>;
  expect(verdict["corruptions"] ?? 0, why).toBe(0);
  expect(verdict["leaks"] ?? 0, why).toBe(0);
  const info = JSON.parse(run("qemu-img", ["info", "--output=json", image]).stdout) as {
    "virtual-size": number;
  };
  expect(info["virtual-size"]).toBe(result.virtualSize);
  const compare = run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, image]);
  expect(compare.stdout + compare.stderr, why).toMatch(/Images are identical/);
  expect(compare.code, why).toBe(0);
}

describe.skipIf(!hasChromium)("in headless Chromium, from the tarballs", () => {
  const seed = Number(process.env.QIMG_SEED ?? Math.floor(Math.random() * 2 ** 31));
  console.log(`browser write runs: seed ${seed} (QIMG_SEED=${seed} replays them)`);

  it("reads fixture images from bytes: every guest byte matches the manifest's sha256", async () => {
    const { page, errors } = await openPage();
    for (const name of FIXTURES) {
      const fixture = getFixture(name);
      const got = await page.evaluate(
        (req) => (globalThis as unknown as Api).qimgBrowserTest.readFixture(req),
        { name, format: fixture.format as "qcow2" | "qed", url: `/fixtures/${name}` },
      );
      expect(got.virtualSize, name).toBe(fixture.virtualSize);
      expect(got.sha256, name).toBe(fixture.sha256);
      expect(got.checkExitCode, name).toBe(fixture.check?.exitCode ?? 0);
      expect(got.clusterSize, name).toBe(fixture.info?.["cluster-size"]);
    }
    expect(errors).toEqual([]);
    await page.close();
  });

  it.skipIf(!hasQemu)(
    "writes a qcow2 image in memory that qemu-img finds clean and equal",
    async () => {
      const { page, errors } = await openPage();
      const result = await page.evaluate(
        (o) => (globalThis as unknown as Api).qimgBrowserTest.writeImage(o),
        { seed, size: 3 * 1024 * 1024 + 12345, clusterSize: 4096 },
      );
      expect(result.ops.length).toBeGreaterThan(20);
      checkWithQemu("plain", result, seed);
      expect(errors).toEqual([]);
      await page.close();
    },
  );

  it("zstd compression fails with a clear error, not a hang, when zstd.wasm is not served", async () => {
    serveWasm = false;
    const { page } = await openPage();
    const started = Date.now();
    const outcome = await page.evaluate(() =>
      (globalThis as unknown as Api).qimgBrowserTest.zstdCompress(),
    );
    expect(outcome).toMatch(/^UnsupportedFeatureError: zstd compression is unavailable/);
    expect(Date.now() - started).toBeLessThan(15_000);
    await page.close();
  });

  it.skipIf(!hasQemu)("with zstd.wasm served, zstd-compressed writes pass qemu-img", async () => {
    serveWasm = true;
    const { page, errors } = await openPage();
    expect(
      await page.evaluate(() => (globalThis as unknown as Api).qimgBrowserTest.zstdCompress()),
    ).toBe("compressed");
    const result = await page.evaluate(
      (o) => (globalThis as unknown as Api).qimgBrowserTest.writeImage(o),
      {
        seed: seed + 1,
        size: 2 * 1024 * 1024 + 4097,
        clusterSize: 65536,
        compression: "zstd" as const,
      },
    );
    expect(result.ops.some((op) => op.kind === "compressed")).toBe(true);
    checkWithQemu("zstd", result, seed + 1);
    expect(errors).toEqual([]);
    await page.close();
  });
});
