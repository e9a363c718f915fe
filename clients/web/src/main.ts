/**
 * The Cutout page: paste an API key, drop images, watch each one through the queue
 * (WatchJob over gRPC-Web through Envoy), see and download the cutouts.
 *
 * Browsers open at most 6 HTTP/1.1 connections to one origin, and a gRPC-Web
 * stream holds one for as long as it runs, so the page never has more than
 * WATCHES watches, SUBMITS submits and one poll open at once: the images beyond
 * are sent and watched in turn, and their queue positions come from a GetJob
 * poll meanwhile.
 */

import {
  type CutoutClient,
  CutoutError,
  createWebClient,
  type FormatName,
  type Job,
  JobState,
  randomKey,
  Stage,
} from "cutout-client/web";
import { zipSync } from "fflate";
import { bytes, describeJob, explain } from "./messages.js";

const KEY_STORAGE = "cutout.apiKey";
const WATCHES = 3;
const SUBMITS = 2;
const POLL_MS = 2000;
const POLLED = 10;
const IMAGE_TYPES = /^image\//;

type Phase = "waiting" | "sending" | "sent" | "watching" | "done" | "error";

interface Card {
  root: HTMLLIElement;
  original: HTMLImageElement;
  cutout: HTMLImageElement;
  status: HTMLParagraphElement;
  progress: HTMLProgressElement;
  error: HTMLParagraphElement;
  download: HTMLAnchorElement;
  retry: HTMLButtonElement;
}

interface Item {
  file: File;
  /** The cutout's file name: the original's, with the output's extension (unique on the page). */
  outName: string;
  format: FormatName;
  /** Sent with every submit of this file, so a repeat never makes a second job. */
  clientKey: string;
  phase: Phase;
  jobName?: string;
  job?: Job;
  result?: { data: Uint8Array<ArrayBuffer>; url: string };
  /** Every state the page has shown, in order ("QUEUED:3", "RUNNING:INFERENCE:40", "SUCCEEDED"). */
  history: string[];
  retryTimer?: ReturnType<typeof setTimeout>;
  card: Card;
}

function $<T extends HTMLElement>(selector: string): T {
  const found = document.querySelector<T>(selector);
  if (!found) throw new Error(`the page has no ${selector}`);
  return found;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<HTMLElementTagNameMap[K]> = {},
  ...children: Node[]
): HTMLElementTagNameMap[K] {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const items: Item[] = [];
const usedNames = new Set<string>();
let client: CutoutClient | undefined;
let apiUrl = "";
let sending = 0;
let watching = 0;
let pollTimer: ReturnType<typeof setTimeout> | undefined;

// --- the API key: this tab only ------------------------------------------------------

function useKey(key: string): void {
  const trimmed = key.trim();
  client = trimmed
    ? createWebClient({ baseUrl: apiUrl, apiKey: trimmed, rateLimitWaitMs: 0 })
    : undefined;
  if (trimmed) {
    sessionStorage.setItem(KEY_STORAGE, trimmed);
  } else {
    sessionStorage.removeItem(KEY_STORAGE);
  }
  $("#key-state").textContent = trimmed
    ? "Key in use. It stays in this tab only and is gone when you close it."
    : "No key yet: paste your API key to start.";
  document.body.dataset.key = trimmed ? "set" : "none";
  // Images refused for the key (or held until there was one) go again.
  for (const item of items) {
    if (item.phase === "error" && !item.jobName) setPhase(item, "waiting");
  }
  pump();
}

// --- cards -----------------------------------------------------------------------------

function uniqueName(file: File, format: FormatName): string {
  const base = (file.webkitRelativePath || file.name)
    .replace(/\.[^./]+$/, "")
    .replace(/[\\/]/g, "_");
  const ext = format === "webp" ? "webp" : "png";
  let name = `${base}.${ext}`;
  for (let n = 2; usedNames.has(name); n++) name = `${base} (${n}).${ext}`;
  usedNames.add(name);
  return name;
}

function newCard(file: File): Card {
  const original = el("img", { className: "original", alt: `original: ${file.name}` });
  original.src = URL.createObjectURL(file);
  // A file the browser cannot show (not an image, or TIFF): say so instead of a broken icon.
  original.onerror = () =>
    original.replaceWith(el("span", { className: "no-preview", textContent: "No preview" }));
  const cutout = el("img", { className: "cutout", alt: "" });
  const status = el("p", { className: "status", textContent: "Waiting to be sent" });
  const progress = el("progress", { max: 100, value: 0 });
  const error = el("p", { className: "error" });
  error.setAttribute("role", "alert");
  const download = el("a", { className: "download button", textContent: "Download" });
  const retry = el("button", { className: "retry", type: "button", textContent: "Retry" });
  download.hidden = true;
  retry.hidden = true;
  const root = el(
    "li",
    { className: "job" },
    el("figure", { className: "pane" }, original),
    el("figure", { className: "pane checkerboard" }, cutout),
    el(
      "div",
      { className: "info" },
      el("p", { className: "name", textContent: file.webkitRelativePath || file.name }),
      status,
      progress,
      error,
      el("div", { className: "actions" }, download, retry),
    ),
  );
  return { root, original, cutout, status, progress, error, download, retry };
}

function setPhase(item: Item, phase: Phase): void {
  item.phase = phase;
  item.card.root.dataset.phase = phase;
  if (phase !== "error") {
    delete item.card.root.dataset.code;
    item.card.error.textContent = "";
    item.card.retry.hidden = true;
  }
  summarize();
}

function record(item: Item, entry: string): void {
  if (item.history.at(-1) !== entry) {
    item.history.push(entry);
    item.card.root.dataset.history = item.history.join(" ");
  }
}

function show(item: Item, snapshot: Job): void {
  let job = snapshot;
  const before = item.job;
  if (
    job.state === JobState.QUEUED &&
    job.queuePosition === 0n &&
    before?.state === JobState.QUEUED
  ) {
    // 0 is "not known here" (a replayed event of a job that has since left the queue):
    // keep the place last shown rather than blank it.
    job = {
      ...job,
      queuePosition: before.queuePosition,
      estimatedWait: job.estimatedWait ?? before.estimatedWait,
    };
  }
  item.job = job;
  const { root, status, progress } = item.card;
  root.dataset.state = JobState[job.state];
  status.textContent = describeJob(job);
  if (job.state === JobState.RUNNING) {
    record(item, `RUNNING:${Stage[job.stage]}:${job.progressPercent}`);
    progress.value = job.progressPercent;
  } else if (job.state === JobState.QUEUED) {
    record(item, `QUEUED:${job.queuePosition}`);
  } else {
    record(item, JobState[job.state] ?? "UNKNOWN");
    if (job.state === JobState.SUCCEEDED) progress.value = 100;
  }
}

function fail(item: Item, err: unknown, again: () => void): void {
  const error = CutoutError.from(err);
  const explained = explain(error, item.file.size);
  const { card } = item;
  setPhase(item, "error");
  if (!item.jobName) {
    card.status.textContent =
      explained.retryInMs === undefined ? "Not sent" : "Waiting to send again";
  }
  card.root.dataset.code = String(error.code);
  card.error.textContent = explained.text;
  card.retry.hidden = !explained.retryable;
  card.retry.onclick = () => {
    clearTimeout(item.retryTimer);
    again();
  };
  if (explained.retryInMs !== undefined) {
    const due = Date.now() + explained.retryInMs;
    const tick = () => {
      const left = due - Date.now();
      if (left <= 0 || item.phase !== "error") {
        if (item.phase === "error") again();
        return;
      }
      card.error.textContent = explained.text.replace(
        /Retrying in .*$/,
        `Retrying in ${Math.ceil(left / 1000)} s.`,
      );
      item.retryTimer = setTimeout(tick, Math.min(1000, left));
    };
    item.retryTimer = setTimeout(tick, Math.min(1000, explained.retryInMs));
  }
}

// --- the work: send, watch, fetch --------------------------------------------------------

async function send(item: Item, api: CutoutClient): Promise<void> {
  setPhase(item, "sending");
  item.card.status.textContent = "Sending…";
  sending++;
  try {
    const job = await api.submit(item.file, { format: item.format, clientKey: item.clientKey });
    item.jobName = job.name;
    item.card.root.dataset.job = job.name;
    setPhase(item, "sent");
    show(item, job);
  } catch (err) {
    fail(item, err, () => {
      setPhase(item, "waiting");
      pump();
    });
  } finally {
    sending--;
    pump();
  }
}

async function follow(item: Item, api: CutoutClient, name: string): Promise<void> {
  setPhase(item, "watching");
  watching++;
  try {
    for await (const event of api.watch(name)) {
      if (event.job) show(item, event.job);
    }
    const job = item.job ?? (await api.getJob(name));
    if (job.state === JobState.SUCCEEDED) {
      const { result, data } = await api.getResult(name);
      const url = URL.createObjectURL(new Blob([data], { type: result.contentType }));
      item.result = { data, url };
      item.card.cutout.src = url;
      item.card.cutout.alt = `cutout: ${item.file.name}`;
      item.card.download.href = url;
      item.card.download.download = item.outName;
      item.card.download.hidden = false;
      item.card.status.textContent = `Done · ${result.widthPx} × ${result.heightPx} px · ${bytes(data.length)}`;
      setPhase(item, "done");
    } else if (job.outcome.case === "error") {
      const why = CutoutError.fromStatus(job.outcome.value);
      setPhase(item, "error");
      item.card.error.textContent =
        job.state === JobState.CANCELLED ? "Cancelled." : `Could not be processed: ${why.reason}`;
    }
  } catch (err) {
    fail(item, err, () => {
      setPhase(item, "sent");
      pump();
    });
  } finally {
    watching--;
    pump();
  }
}

/** Start what the connection budget allows: oldest first, as the queue serves them. */
function pump(): void {
  const api = client;
  if (!api) {
    for (const item of items) {
      if (item.phase === "waiting") item.card.status.textContent = "Waiting for an API key";
    }
    return;
  }
  for (const item of items) {
    if (item.phase === "waiting" && sending < SUBMITS) {
      void send(item, api);
    } else if (item.phase === "sent" && item.jobName && watching < WATCHES) {
      void follow(item, api, item.jobName);
    }
  }
  schedulePoll();
  summarize();
}

/**
 * Queue positions and ETAs of the jobs not watched yet, from GetJob (which, unlike
 * ListJobs, computes them), for the POLLED oldest: they are the next to run, and
 * the places further back only shrink from what their submit said.
 */
function schedulePoll(): void {
  const unwatched = () => items.filter((i) => i.phase === "sent").slice(0, POLLED);
  if (pollTimer !== undefined || unwatched().length === 0) return;
  pollTimer = setTimeout(async () => {
    try {
      for (const item of unwatched()) {
        const api = client;
        if (!api || !item.jobName) break;
        const job = await api.getJob(item.jobName);
        if (item.phase === "sent") show(item, job);
      }
    } catch {
      // A missed poll only delays a position update; the watch will bring the truth.
    } finally {
      pollTimer = undefined;
      schedulePoll();
    }
  }, POLL_MS);
}

function summarize(): void {
  const count = (...phases: Phase[]) => items.filter((i) => phases.includes(i.phase)).length;
  const done = count("done");
  const attention = count("error");
  const busy = items.length - done - attention;
  const parts = [`${items.length} image${items.length === 1 ? "" : "s"}`, `${done} done`];
  if (busy) parts.push(`${busy} in progress`);
  if (attention) parts.push(`${attention} need${attention === 1 ? "s" : ""} attention`);
  $("#summary-text").textContent = items.length ? parts.join(" · ") : "";
  const all = $<HTMLButtonElement>("#download-all");
  all.disabled = done === 0;
  all.textContent = done > 1 ? `Download all ${done} (.zip)` : "Download all (.zip)";
}

function add(files: Iterable<File>): void {
  const format = $<HTMLSelectElement>("#format").value as FormatName;
  for (const file of files) {
    const item: Item = {
      file,
      outName: uniqueName(file, format),
      format,
      clientKey: randomKey(),
      phase: "waiting",
      history: [],
      card: newCard(file),
    };
    items.push(item);
    $("#jobs").append(item.card.root);
    setPhase(item, "waiting");
  }
  pump();
}

function downloadAll(): void {
  const files: Record<string, [Uint8Array, { level: 0 }]> = {};
  for (const item of items) {
    // Already-compressed images: stored, not deflated again.
    if (item.result) files[item.outName] = [item.result.data, { level: 0 }];
  }
  const zip = zipSync(files);
  const url = URL.createObjectURL(
    new Blob([zip as Uint8Array<ArrayBuffer>], { type: "application/zip" }),
  );
  const a = el("a", { href: url, download: "cutouts.zip" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// --- picking and dropping files ------------------------------------------------------------

async function filesOf(entry: FileSystemEntry): Promise<File[]> {
  if (entry.isFile) {
    const file = await new Promise<File>((resolve, reject) =>
      (entry as FileSystemFileEntry).file(resolve, reject),
    );
    return [file];
  }
  const reader = (entry as FileSystemDirectoryEntry).createReader();
  const out: File[] = [];
  for (;;) {
    const batch = await new Promise<FileSystemEntry[]>((resolve, reject) =>
      reader.readEntries(resolve, reject),
    );
    if (batch.length === 0) break;
    for (const child of batch) {
      // Inside folders only images: a folder of photos often holds other files too.
      out.push(...(await filesOf(child)).filter((f) => IMAGE_TYPES.test(f.type)));
    }
  }
  return out;
}

async function dropped(data: DataTransfer): Promise<File[]> {
  const entries = Array.from(data.items, (i) => i.webkitGetAsEntry?.()).filter(
    (e): e is FileSystemEntry => Boolean(e),
  );
  if (entries.length === 0) return Array.from(data.files);
  return (await Promise.all(entries.map(filesOf))).flat();
}

function wire(): void {
  const zone = $("#drop");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer) void dropped(e.dataTransfer).then(add);
  });
  const picker = $<HTMLInputElement>("#files");
  picker.addEventListener("change", () => {
    add(Array.from(picker.files ?? []));
    picker.value = "";
  });
  const folder = $<HTMLInputElement>("#folder");
  folder.addEventListener("change", () => {
    add(Array.from(folder.files ?? []).filter((f) => IMAGE_TYPES.test(f.type)));
    folder.value = "";
  });
  const keyInput = $<HTMLInputElement>("#api-key");
  keyInput.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  $<HTMLFormElement>("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    useKey(keyInput.value);
  });
  $("#forget-key").addEventListener("click", () => {
    keyInput.value = "";
    useKey("");
  });
  $("#download-all").addEventListener("click", downloadAll);
}

/** Where the API is: ?api=URL, else config.json beside the page, else this host's port 8080. */
async function findApi(): Promise<string> {
  const asked = new URLSearchParams(location.search).get("api");
  if (asked) return asked;
  try {
    const reply = await fetch("config.json", { cache: "no-store" });
    if (reply.ok) {
      const config = (await reply.json()) as { api?: string };
      if (config.api) return config.api;
    }
  } catch {
    // No config.json: fall through to the default.
  }
  return `${location.protocol}//${location.hostname}:8080`;
}

async function main(): Promise<void> {
  apiUrl = (await findApi()).replace(/\/+$/, "");
  $("#api-url").textContent = apiUrl;
  wire();
  useKey($<HTMLInputElement>("#api-key").value);
  document.body.dataset.ready = "true";
}

void main();
