// The clinician's flow of DESIGN §1 in a real browser (Debian's Chromium, headless),
// against a running `ehrgate demo`. Run by tests/it/browser.rs, which starts the demo and
// then checks the audit log. Exits non-zero with the failing step named.
//
// Environment: EMR_URL, EHR_URL (https://…:PORT/), SERVER_CERT (PEM path), TOTP_SECRET,
// EMR_USER, EMR_PASSWORD, EMR_PIN, ONEID_USER, ONEID_PASSWORD, SHOTS (screenshot folder).

import { chromium } from "playwright-core";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const EMR = env("EMR_URL");
const EHR = env("EHR_URL");
const SHOTS = env("SHOTS");
fs.rmSync(SHOTS, { recursive: true, force: true });
fs.mkdirSync(SHOTS, { recursive: true });

/** Trust exactly the demo's server key: SHA-256 of its SubjectPublicKeyInfo, base64. */
function spkiHash(pemPath) {
  const cert = new crypto.X509Certificate(fs.readFileSync(pemPath));
  const spki = cert.publicKey.export({ type: "spki", format: "der" });
  return crypto.createHash("sha256").update(spki).digest("base64");
}

/** RFC 6238 TOTP, HMAC-SHA1, 30 s, 6 digits. */
function totp(secret) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(Date.now() / 1000 / 30)));
  const h = crypto.createHmac("sha1", Buffer.from(secret)).update(counter).digest();
  const o = h[h.length - 1] & 0x0f;
  const code = ((h[o] & 0x7f) << 24) | (h[o + 1] << 16) | (h[o + 2] << 8) | h[o + 3];
  return String(code % 1_000_000).padStart(6, "0");
}

let step = "start";
let shot = 0;
async function snap(page, name) {
  shot += 1;
  const file = path.join(SHOTS, `${String(shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  console.log(`  screenshot ${file}`);
}
function expect(cond, what) {
  if (!cond) throw new Error(`expected: ${what}`);
}

// Chromium's profile, made for this run and removed after it, whatever its outcome.
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "ehrgate-chromium-"));
const removeProfile = () => fs.rmSync(profile, { recursive: true, force: true });
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1100, height: 720 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
      "--host-resolver-rules=MAP *.localhost 127.0.0.1",
      `--ignore-certificate-errors-spki-list=${spkiHash(env("SERVER_CERT"))}`,
    ],
  });
} catch (e) {
  console.error(`Chromium could not start (${e.message}). Install it with scripts/install-test-deps.sh.`);
  removeProfile();
  process.exit(2);
}
context.setDefaultTimeout(10_000);

async function oneIdLogin(page) {
  await page.waitForSelector("#oneid-username");
  await page.fill("#oneid-username", env("ONEID_USER"));
  await page.fill("#oneid-password", env("ONEID_PASSWORD"));
  await page.click("#oneid-next");
  await page.waitForSelector("#oneid-code");
  await page.fill("#oneid-code", totp(env("TOTP_SECRET")));
  await page.click("#oneid-verify");
}

async function openChart(emr, family) {
  await emr.goto(`${EMR}oscar/provider/providercontrol.jsp`);
  await emr.click(`a.patient:has-text("${family}")`);
  await emr.waitForSelector("#ehr-button");
}

async function openOverlay(emr) {
  if (await emr.isHidden("#ehr-overlay")) await emr.click("#ehr-button");
  await emr.waitForSelector("#ehr-overlay:not([hidden])");
}

async function connect(emr) {
  await openOverlay(emr);
  await emr.waitForSelector("#authority-row:not([hidden])");
  const [popup] = await Promise.all([context.waitForEvent("page"), emr.click("#connect")]);
  await popup.waitForLoadState("domcontentloaded");
  return popup;
}

try {
  const emr = context.pages()[0] ?? (await context.newPage());

  step = "EMR login";
  await emr.goto(`${EMR}oscar/index.jsp`);
  await snap(emr, "emr-login");
  await emr.fill("#username", env("EMR_USER"));
  await emr.fill("#password", env("EMR_PASSWORD"));
  await emr.fill("#pin", env("EMR_PIN"));
  await emr.click("#login");
  await emr.waitForSelector("text=Today's schedule");

  step = "chart of a patient whose MRP is another provider";
  await openChart(emr, "Okafor");
  expect((await emr.textContent("#patient-name")).includes("Okafor"), "the chart shows the patient");

  step = "EHR overlay with the authority drop-down";
  await emr.click("#ehr-button");
  await emr.waitForSelector("#authority-row:not([hidden])");
  const options = await emr.$$eval("#authority option", (os) => os.map((o) => o.textContent));
  expect(options.length === 2, `two authorities offered, got ${options}`);
  expect(await emr.isChecked("input[name=ehr-system]"), "ClinicalConnect Viewer selected");
  expect(await emr.isHidden("#disconnect"), "no Disconnect before connecting");
  await snap(emr, "emr-chart-ehr-overlay");
  await emr.click("#ehr-button"); // close it; connect() opens it again

  step = "Connect to EHR opens a new window at ONE ID";
  let viewer = await connect(emr);
  expect(viewer.url().includes("/oneid/login"), `ONE ID first, got ${viewer.url()}`);
  await snap(viewer, "oneid-login");

  step = "ONE ID with two factors";
  await oneIdLogin(viewer);

  step = "non-MRP warning and override";
  await viewer.waitForSelector("#mrp-warning");
  await snap(viewer, "viewer-mrp-warning");
  await viewer.selectOption("#reason", "PROFJUDG");
  await viewer.click("#perform-override");

  step = "viewer chart";
  await viewer.waitForSelector("#patient-banner");
  expect((await viewer.textContent("#patient-banner")).includes("Okafor"), "the viewer opened the patient");
  await viewer.waitForFunction(() => /\d+/.test(document.getElementById("vitals").textContent));
  await snap(viewer, "viewer-chart");

  step = "close the viewer tab; EHR on another patient needs no new ONE ID login";
  await viewer.close();
  await openChart(emr, "Tremblay");
  viewer = await connect(emr);
  await viewer.waitForSelector("#patient-banner");
  expect(!viewer.url().includes("/oneid/"), `no ONE ID login, got ${viewer.url()}`);
  expect((await viewer.textContent("#patient-banner")).includes("Tremblay"), "the second patient");

  step = "Disconnect (shown while connected) ends the EHR session only";
  await emr.bringToFront();
  await openOverlay(emr);
  await emr.waitForSelector("#disconnect:not([hidden])");
  await snap(emr, "emr-connected-disconnect");
  const closed = viewer.waitForEvent("close", { timeout: 30000 });
  await emr.click("#disconnect");
  await emr.waitForSelector("#disconnect", { state: "hidden" });
  await closed;
  expect((await emr.textContent("#patient-name")).includes("Tremblay"), "the EMR stays usable");

  step = "after Disconnect the EHR asks for ONE ID again";
  viewer = await connect(emr);
  expect(viewer.url().includes("/oneid/login"), `ONE ID again, got ${viewer.url()}`);
  await oneIdLogin(viewer);
  await viewer.waitForSelector("#patient-banner");

  step = "EMR logout closes the open viewer tab within 2 s";
  const gone = viewer.waitForEvent("close", { timeout: 30000 });
  await emr.bringToFront();
  await emr.click("#logout");
  await gone;
  await emr.waitForSelector("#username");

  step = "the viewer URL refuses access";
  const probe = await context.newPage();
  const resp = await probe.goto(`${EHR}chart`);
  expect(resp.status() === 401, `401 from the viewer host, got ${resp.status()}`);
  expect((await probe.textContent("h1")).includes("EHR session ended"), "the ended notice");
  await snap(probe, "viewer-refused-after-logout");

  console.log("browser flow: all steps passed");
  await context.close();
  removeProfile();
} catch (e) {
  console.error(`browser flow failed at step "${step}": ${e.message}`);
  for (const p of context.pages()) {
    try {
      await snap(p, "failure");
    } catch {}
  }
  await context.close();
  removeProfile();
  process.exit(1);
}
