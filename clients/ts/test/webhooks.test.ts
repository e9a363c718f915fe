/**
 * verifyWebhook against the Standard Webhooks specification's own example (no cluster
 * needed); tests/cluster/test_webhooks.py also runs it on a real delivery from a scheduler.
 */

import assert from "node:assert/strict";
import { test } from "node:test";
import { verifyWebhook, WebhookVerificationError, webhookSignature } from "../src/index.js";

// The example of https://github.com/standard-webhooks/standard-webhooks (spec and libraries).
const SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ID = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const BODY = '{"test": 2432232314}';

test("signs the specification's example as the specification does", async () => {
  const signature = await webhookSignature(SECRET, ID, "1614265330", BODY);
  assert.equal(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
});

test("accepts any matching signature of several and refuses forgeries and stale ones", async () => {
  const now = String(Math.floor(Date.now() / 1000));
  const body = JSON.stringify({
    type: "job.succeeded",
    timestamp: new Date().toISOString(),
    data: { job: { name: "jobs/abc", state: "JOB_STATE_SUCCEEDED", futureField: 1 } },
  });
  const other = "whsec_" + Buffer.alloc(32, 7).toString("base64");
  const signatures = `${await webhookSignature(other, ID, now, body)} ${await webhookSignature(SECRET, ID, now, body)}`;
  const headers = { "Webhook-Id": ID, "webhook-timestamp": now, "webhook-signature": signatures };
  const event = await verifyWebhook(SECRET, headers, new TextEncoder().encode(body));
  assert.equal(event.type, "job.succeeded");
  assert.equal(event.id, ID);
  assert.equal(event.job?.name, "jobs/abc");
  await assert.rejects(
    verifyWebhook(SECRET, { ...headers, "Webhook-Id": "msg_other" }, body),
    WebhookVerificationError,
  );
  await assert.rejects(
    verifyWebhook(SECRET, headers, body.replace("abc", "abd")),
    WebhookVerificationError,
  );
  const stale = String(Number(now) - 3600);
  const old = {
    ...headers,
    "webhook-timestamp": stale,
    "webhook-signature": await webhookSignature(SECRET, ID, stale, body),
  };
  await assert.rejects(verifyWebhook(SECRET, old, body), /not within 300 s/);
});
