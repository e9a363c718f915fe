/**
 * Verifying Cutout's webhook deliveries (Standard Webhooks signatures) and reading
 * them as the API's own messages. Works in Node 20+ and browsers (WebCrypto).
 *
 *     const event = await verifyWebhook(process.env.CUTOUT_WEBHOOK_SECRET!, req.headers, rawBody);
 *     if (event.job?.outcome.case === "result") console.log(event.job.name, event.job.outcome.value.uri);
 *
 * Pass the body exactly as received (bytes or string), before any JSON parsing.
 */

import { fromJson, type JsonValue } from "@bufbuild/protobuf";
import {
  type BatchProgress,
  BatchProgressSchema,
  type Job,
  JobSchema,
} from "./gen/cutout/v1/jobs_pb.js";

/** A delivery whose signature, id or timestamp does not check out. */
export class WebhookVerificationError extends Error {
  override name = "WebhookVerificationError";
}

/** One verified delivery: the job (job.*) or the batch (batch.completed) as it was sent. */
export interface WebhookEvent {
  /** "job.succeeded", "job.failed", "job.cancelled" or "batch.completed". */
  type: string;
  /** When the delivery was made (ISO 8601). */
  timestamp: string;
  /** The webhook-id header: the same on every retry of one delivery; dedupe on it. */
  id: string;
  job?: Job;
  batch?: BatchProgress;
}

type HeaderSource = Headers | Record<string, string | string[] | undefined>;

function header(headers: HeaderSource, name: string): string {
  if (typeof (headers as Headers).get === "function") {
    return (headers as Headers).get(name) ?? "";
  }
  const record = headers as Record<string, string | string[] | undefined>;
  const key = Object.keys(record).find((k) => k.toLowerCase() === name);
  const value = key === undefined ? undefined : record[key];
  return (Array.isArray(value) ? value[0] : value) ?? "";
}

function fromBase64(text: string): Uint8Array<ArrayBuffer> {
  const chars = atob(text);
  const out = new Uint8Array(chars.length);
  for (let i = 0; i < chars.length; i++) out[i] = chars.charCodeAt(i);
  return out;
}

function toBase64(bytes: Uint8Array): string {
  return btoa(String.fromCharCode(...bytes));
}

function sameText(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

/** The "v1,<base64>" signature of one delivery under one secret ("whsec_..."). */
export async function webhookSignature(
  secret: string,
  id: string,
  timestamp: string,
  body: Uint8Array | string,
): Promise<string> {
  const raw = typeof body === "string" ? new TextEncoder().encode(body) : body;
  const prefix = new TextEncoder().encode(`${id}.${timestamp}.`);
  const content = new Uint8Array(prefix.length + raw.length);
  content.set(prefix);
  content.set(raw, prefix.length);
  const key = await crypto.subtle.importKey(
    "raw",
    fromBase64(secret.replace(/^whsec_/, "")),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  return `v1,${toBase64(new Uint8Array(await crypto.subtle.sign("HMAC", key, content)))}`;
}

/**
 * Check a delivery's signature against your secret (any of the signatures in the
 * header may match: during a secret rotation Cutout signs with both), and that its
 * timestamp is within toleranceS of now; then parse it. Throws WebhookVerificationError.
 */
export async function verifyWebhook(
  secret: string,
  headers: HeaderSource,
  body: Uint8Array | string,
  toleranceS = 300,
): Promise<WebhookEvent> {
  const id = header(headers, "webhook-id");
  const timestamp = header(headers, "webhook-timestamp");
  const signatures = header(headers, "webhook-signature");
  if (!id || !timestamp || !signatures) {
    throw new WebhookVerificationError(
      "missing webhook-id, webhook-timestamp or webhook-signature",
    );
  }
  const sent = Number(timestamp);
  if (!Number.isFinite(sent) || Math.abs(Date.now() / 1000 - sent) > toleranceS) {
    throw new WebhookVerificationError(
      `timestamp ${timestamp} is not within ${toleranceS} s of now`,
    );
  }
  const expected = await webhookSignature(secret, id, timestamp, body);
  if (!signatures.split(" ").some((s) => sameText(s, expected))) {
    throw new WebhookVerificationError("no signature matches this secret");
  }
  const text = typeof body === "string" ? body : new TextDecoder().decode(body);
  const payload = JSON.parse(text) as {
    type: string;
    timestamp: string;
    data: Record<string, JsonValue>;
  };
  const event: WebhookEvent = { type: payload.type, timestamp: payload.timestamp, id };
  if (payload.data.job !== undefined)
    event.job = fromJson(JobSchema, payload.data.job, { ignoreUnknownFields: true });
  if (payload.data.batch !== undefined) {
    event.batch = fromJson(BatchProgressSchema, payload.data.batch, { ignoreUnknownFields: true });
  }
  return event;
}
