/**
 * The page in a real browser (Debian's Chromium, driven by playwright-core) against
 * a live cluster through Envoy, started by tests/cluster/test_web_page.py, which passes:
 *
 *   CUTOUT_WEB_URL         the page (services/local/webpage.py, which tells it Envoy's URL)
 *   CUTOUT_TEST_KEY        a vendor's key
 *   CUTOUT_TEST_KEY_LIMITED  a vendor allowed 1 request per few seconds
 *   CUTOUT_TEST_PHOTOS     three JPEG photos, joined by the path delimiter
 *   CUTOUT_TEST_NOT_IMAGE  a file that is not an image
 *   CUTOUT_TEST_ARTIFACTS  where the screenshot and the downloads go
 *   CHROMIUM               the browser (default /usr/bin/chromium)
 */

import assert from "node:assert/strict";
import { mkdir, readFile } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { unzipSync } from "fflate";
import { type Browser, chromium, type Locator, type Page } from "playwright-core";

function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through tests/cluster/test_web_page.py`);
  }
  return value;
}

const URL_ = env("CUTOUT_WEB_URL");
const KEY = env("CUTOUT_TEST_KEY");
const KEY_LIMITED = env("CUTOUT_TEST_KEY_LIMITED");
const PHOTOS = env("CUTOUT_TEST_PHOTOS").split(delimiter);
const NOT_IMAGE = env("CUTOUT_TEST_NOT_IMAGE");
const ARTIFACTS = env("CUTOUT_TEST_ARTIFACTS");
const WAIT_MS = 120_000;

/** Colour type from a PNG's IHDR (6: RGBA); throws if the bytes are not a PNG. */
function pngColourType(data: Uint8Array): number {
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  assert.ok(
    signature.every((b, i) => data[i] === b),
    "not a PNG",
  );
  assert.equal(new TextDecoder().decode(data.subarray(12, 16)), "IHDR");
  return data[25] ?? -1;
}

async function useKey(page: Page, key: string): Promise<void> {
  await page.fill("#api-key", key);
  await page.click("#key-form button[type=submit]");
  await page.waitForSelector("body[data-key=set]");
}

async function history(card: Locator): Promise<string[]> {
  return ((await card.getAttribute("data-history")) ?? "").split(" ");
}

describe("the web page, in Chromium, through Envoy", () => {
  let browser: Browser;
  let page: Page;

  before(async () => {
    await mkdir(ARTIFACTS, { recursive: true });
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
      headless: true,
      args: ["--no-sandbox"],
    });
    const context = await browser.newContext({
      acceptDownloads: true,
      viewport: { width: 1100, height: 1000 },
    });
    page = await context.newPage();
    page.on("console", (m) => {
      if (m.type() === "error") console.log(`browser console: ${m.text()}`);
    });
    page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
    await page.goto(URL_);
    await page.waitForSelector("body[data-ready=true]");
  });

  after(async () => {
    await browser?.close();
  });

  test("three photos go through the queue; their cutouts are PNGs with alpha", async () => {
    await useKey(page, KEY);
    await page.setInputFiles("#files", [...PHOTOS, NOT_IMAGE]);

    const cards = page.locator("#jobs .job");
    await page.waitForFunction(
      (n) => document.querySelectorAll(".job[data-phase=done] img.cutout[src]").length === n,
      PHOTOS.length,
      { timeout: WAIT_MS },
    );
    assert.equal(await cards.count(), PHOTOS.length + 1);

    for (let i = 0; i < PHOTOS.length; i++) {
      const card = cards.nth(i);
      const seen = await history(card);
      // What the card showed, in order: queued (with its place in line), the node's stages, done.
      assert.match(seen[0] ?? "", /^QUEUED:[1-9]\d*$/, seen.join(" "));
      assert.equal(seen.at(-1), "SUCCEEDED", seen.join(" "));
      const stages = seen.filter((s) => s.startsWith("RUNNING:")).map((s) => s.split(":")[1]);
      for (const stage of ["DECODING", "INFERENCE", "ENCODING"]) {
        assert.ok(stages.includes(stage), `never showed ${stage}: ${seen.join(" ")}`);
      }
      assert.equal(
        await card.locator("progress").evaluate((p: HTMLProgressElement) => p.value),
        100,
      );
      assert.match((await card.locator(".status").textContent()) ?? "", /^Done · \d+ × \d+ px · /);
      const shown = await card
        .locator("img.cutout")
        .evaluate((img: HTMLImageElement) => img.complete && img.naturalWidth > 0);
      assert.ok(shown, "the cutout is displayed");
    }

    // The file that is not an image says so, in words, and offers no pointless retry.
    const bad = cards.nth(PHOTOS.length);
    assert.equal(await bad.getAttribute("data-phase"), "error");
    assert.match((await bad.locator(".error").textContent()) ?? "", /Not an image Cutout can read/);
    assert.ok(await bad.locator(".retry").isHidden());

    // One download, then all of them as a zip.
    const [one] = await Promise.all([
      page.waitForEvent("download"),
      cards.nth(0).locator("a.download").click(),
    ]);
    assert.match(one.suggestedFilename(), /\.png$/);
    const onePath = join(ARTIFACTS, one.suggestedFilename());
    await one.saveAs(onePath);
    assert.equal(pngColourType(await readFile(onePath)), 6, "a cutout is RGBA");

    const [all] = await Promise.all([page.waitForEvent("download"), page.click("#download-all")]);
    assert.equal(all.suggestedFilename(), "cutouts.zip");
    const zipPath = join(ARTIFACTS, "cutouts.zip");
    await all.saveAs(zipPath);
    const files = unzipSync(await readFile(zipPath));
    assert.equal(Object.keys(files).length, PHOTOS.length, Object.keys(files).join(", "));
    for (const [name, data] of Object.entries(files)) {
      assert.equal(pngColourType(data), 6, `${name} is RGBA`);
    }

    const screenshot = join(ARTIFACTS, "page.png");
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(`screenshot: ${screenshot}`);
  });

  test("the key stays in this tab only", async () => {
    const stored = await page.evaluate(() => ({
      session: sessionStorage.getItem("cutout.apiKey"),
      local: localStorage.length,
      cookies: document.cookie,
    }));
    assert.deepEqual(stored, { session: KEY, local: 0, cookies: "" });
    await page.reload();
    await page.waitForSelector("body[data-ready=true]");
    assert.equal(await page.inputValue("#api-key"), KEY, "a reload keeps it");
  });

  test("a rate-limited image says when it will be retried, then goes through", async () => {
    await useKey(page, KEY_LIMITED);
    await page.setInputFiles("#files", PHOTOS.slice(0, 2));
    const limited = page.locator(".job[data-code='8'] .error");
    await limited.first().waitFor({ timeout: WAIT_MS });
    assert.match(
      (await limited.first().textContent()) ?? "",
      /^Rate limit reached \(requests: 1 per \d+ s\)\. Retrying in \d+ s\.$/,
    );
    await page.screenshot({ path: join(ARTIFACTS, "rate-limited.png"), fullPage: true });
    await page.waitForFunction(
      () => document.querySelectorAll(".job[data-phase=done]").length === 2,
      undefined,
      { timeout: WAIT_MS },
    );
  });
});
