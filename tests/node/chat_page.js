// The example chat page in headless Chromium (Debian's package), driven by playwright-core.
//
//   node chat_page.js URL [NAME,NAME,...]
//
// Opens a page (a tab of one browser: one connection pool) per name (default alice and
// bob), waits until each is connected (and upgraded to websocket), has each say a line,
// and prints one JSON object: per page, its status line and the lines it heard. Exits 0
// whatever happened: the test judges.
"use strict";
const { chromium } = require("playwright-core");

const url = process.argv[2];
const names = (process.argv[3] || "alice,bob").split(",");
const LINES = Object.fromEntries(names.map((name) => [name, `hello from ${name}`]));

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
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
  const result = {};
  try {
    const pages = {};
    for (const name of Object.keys(LINES)) {
      const page = await browser.newPage();
      page.on("pageerror", (error) => (result[`${name}-error`] = String(error)));
      await page.goto(url);
      await page.waitForSelector("#status[data-transport=websocket]", { timeout: 15000 });
      pages[name] = page;
    }
    for (const [name, page] of Object.entries(pages)) {
      await page.fill("#name", name);
      await page.fill("#text", LINES[name]);
      await page.click("button");
    }
    for (const [name, page] of Object.entries(pages)) {
      await page
        .waitForFunction((count) => document.querySelectorAll("#log li").length >= count, names.length, {
          timeout: 15000,
        })
        .catch(() => {});
      result[name] = {
        status: await page.textContent("#status"),
        heard: await page.$$eval("#log li", (items) => items.map((item) => item.textContent)),
      };
    }
  } catch (error) {
    result.fatal = String(error && error.stack);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
}

main();
