/**
 * The TypeScript client against a live cluster, started by tests/cluster/test_ts_client.py,
 * which passes where it is and whom to be in the environment:
 *
 *   CUTOUT_TEST_ADDR      the public API (the gateway, or Envoy in front of it)
 *   CUTOUT_TEST_PROTOCOL  "grpc" (default) or "grpc-web"
 *   CUTOUT_TEST_KEY_A     vendor A's key; CUTOUT_TEST_KEY_B another vendor's
 *   CUTOUT_TEST_KEY_LIMITED  a vendor allowed 1 request per CUTOUT_TEST_LIMITED_PERIOD_S
 *   CUTOUT_TEST_PHOTO     a JPEG photo
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { createServer } from "node:net";
import { describe, test } from "node:test";
import type { Interceptor } from "@connectrpc/connect";
import {
  type ClientOptions,
  Code,
  CutoutClient,
  CutoutError,
  JobState,
  Stage,
} from "../src/index.js";
import { nodeTransport } from "../src/node.js";
import { pngHeader } from "./png.js";

function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    // Fail, never skip: run through tests/cluster/test_ts_client.py, which sets these.
    throw new Error(`${name} is not set: run these tests through tests/cluster/test_ts_client.py`);
  }
  return value;
}

const ADDR = env("CUTOUT_TEST_ADDR");
const PROTOCOL = process.env.CUTOUT_TEST_PROTOCOL ?? "grpc";
const KEY_A = env("CUTOUT_TEST_KEY_A");
const KEY_B = env("CUTOUT_TEST_KEY_B");
const KEY_LIMITED = env("CUTOUT_TEST_KEY_LIMITED");
const LIMITED_PERIOD_MS = Number(env("CUTOUT_TEST_LIMITED_PERIOD_S")) * 1000;
const PHOTO = await readFile(env("CUTOUT_TEST_PHOTO"));

/** A client on the cluster under test, counting the attempts its calls make. */
function client(apiKey: string, options: Partial<ClientOptions> = {}, address = ADDR) {
  const attempts: string[] = [];
  const count: Interceptor = (next) => (req) => {
    attempts.push(req.method.name);
    return next(req);
  };
  const protocol = PROTOCOL === "grpc-web" ? "grpc-web" : "grpc";
  const transport = nodeTransport(address, protocol, [count]);
  return { client: new CutoutClient(transport, { apiKey, ...options }), attempts };
}

async function refusal(call: Promise<unknown>): Promise<CutoutError> {
  try {
    await call;
  } catch (e) {
    assert.ok(e instanceof CutoutError, `expected a CutoutError, got ${e}`);
    return e;
  }
  assert.fail("the call succeeded; it should have been refused");
}

const PIPELINE = [
  Stage.DECODING,
  Stage.INFERENCE,
  Stage.COMPOSITING,
  Stage.ENCODING,
  Stage.STORING,
];

describe(`cutout-client over ${PROTOCOL} at ${ADDR}`, () => {
  const { client: a } = client(KEY_A);

  test("a photo goes QUEUED, RUNNING through its stages, SUCCEEDED; its cutout is a PNG with alpha", async () => {
    const job = await a.submit(PHOTO);
    assert.match(job.name, /^jobs\/[0-9a-f]{32}$/);
    assert.equal(job.state, JobState.QUEUED);

    const states: JobState[] = [];
    const stages: Stage[] = [];
    const percents: number[] = [];
    for await (const event of a.watch(job.name)) {
      const snapshot = event.job;
      assert.ok(snapshot);
      if (states.at(-1) !== snapshot.state) states.push(snapshot.state);
      if (snapshot.state === JobState.RUNNING) {
        if (stages.at(-1) !== snapshot.stage) stages.push(snapshot.stage);
        percents.push(snapshot.progressPercent);
      }
    }
    assert.deepEqual(states, [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]);
    // Every stage the node reports reaches the watcher, in pipeline order.
    const order = stages.map((s) => PIPELINE.indexOf(s));
    assert.ok(
      order.every((i) => i >= 0),
      `unexpected stages ${stages.map((s) => Stage[s])}`,
    );
    assert.deepEqual(
      order,
      [...order].sort(),
      `stages out of order: ${stages.map((s) => Stage[s])}`,
    );
    for (const stage of [Stage.DECODING, Stage.INFERENCE, Stage.ENCODING]) {
      assert.ok(
        stages.includes(stage),
        `never saw ${Stage[stage]}: ${stages.map((s) => Stage[s])}`,
      );
    }
    assert.deepEqual(
      percents,
      [...percents].sort((x, y) => x - y),
      "progress went backwards",
    );

    const { result, data } = await a.getResult(job.name);
    assert.equal(result.contentType, "image/png");
    assert.equal(data.length, Number(result.sizeBytes));
    assert.equal(createHash("sha256").update(data).digest("hex"), result.sha256);
    const png = pngHeader(data);
    assert.equal(png.colourType, 6, "a cutout is RGBA (PNG colour type 6)");
    assert.deepEqual([png.width, png.height], [result.widthPx, result.heightPx]);

    const done = await a.getJob(job.name);
    assert.equal(done.state, JobState.SUCCEEDED);
    assert.equal(done.outcome.case, "result");
    const listed = await a.listJobs({ state: JobState.SUCCEEDED });
    assert.ok(
      listed.jobs.some((j) => j.name === job.name),
      "ListJobs shows the job",
    );
  });

  test("another vendor's job is NOT_FOUND, whatever the call", async () => {
    const job = await a.submit(PHOTO);
    const { client: b } = client(KEY_B);
    for (const call of [
      () => b.getJob(job.name),
      () => b.getResult(job.name),
      () => b.cancel(job.name),
      () => b.watch(job.name).next(),
    ]) {
      const err = await refusal(call());
      assert.equal(err.code, Code.NotFound, err.message);
    }
    assert.equal((await a.wait(job.name)).state, JobState.SUCCEEDED, "B could not touch it");
    const mine = await b.listJobs();
    assert.ok(!mine.jobs.some((j) => j.name === job.name), "B's list holds only B's jobs");
  });

  test("a bad request names the field that is wrong, and is not retried", async () => {
    const { client: c, attempts } = client(KEY_A);
    const notImage = await refusal(c.submit(new TextEncoder().encode("not an image at all")));
    assert.equal(notImage.code, Code.InvalidArgument);
    assert.deepEqual(
      notImage.violations.map((v) => v.field),
      ["submission.image.content"],
    );
    assert.match(notImage.violations[0]?.description ?? "", /not an image/);

    const jpegCutout = await refusal(c.submit(PHOTO, { format: "jpeg" }));
    assert.equal(jpegCutout.code, Code.InvalidArgument);
    const format = jpegCutout.violations.find((v) => v.field.endsWith("remove_background.format"));
    assert.ok(format, JSON.stringify(jpegCutout.violations));
    assert.match(format.description, /transparency/);
    assert.deepEqual(attempts, ["SubmitJob", "SubmitJob"], "INVALID_ARGUMENT is final");
  });

  test("a batch accepts and refuses its items one by one, with typed reasons", async () => {
    const reply = await a.submitBatch([PHOTO, new Uint8Array([1, 2, 3])]);
    assert.match(reply.batch, /^batches\//);
    const [good, bad] = reply.outcomes;
    assert.equal(good?.outcome.case, "job");
    assert.equal(bad?.outcome.case, "error");
    if (bad?.outcome.case === "error") {
      const err = CutoutError.fromStatus(bad.outcome.value);
      assert.equal(err.code, Code.InvalidArgument);
      assert.ok(err.violations[0]?.field.endsWith("image.content"), JSON.stringify(err.violations));
    }
    if (good?.outcome.case === "job") {
      assert.equal((await a.wait(good.outcome.value.name)).state, JobState.SUCCEEDED);
    }
  });

  test("cancel ends a job that is not done and leaves a finished one as it was", async () => {
    const job = await a.submit(PHOTO);
    const after = await a.cancel(job.name);
    assert.ok(after.done);
    if (after.state === JobState.CANCELLED) {
      assert.equal(after.outcome.case, "error");
    } else {
      assert.equal(after.state, JobState.SUCCEEDED, "finished before the cancel arrived");
    }
    assert.equal((await a.cancel(job.name)).state, after.state, "a second cancel changes nothing");
  });

  test("a rate-limited vendor sees the RetryInfo delay, and the client waits it out", async () => {
    const { client: quick } = client(KEY_LIMITED, { rateLimitWaitMs: 0 });
    await quick.submit(PHOTO, { op: "transform" }); // the one request its quota allows now
    const err = await refusal(quick.submit(PHOTO, { op: "transform" }));
    assert.equal(err.code, Code.ResourceExhausted);
    assert.ok(err.rateLimited);
    assert.ok(
      err.retryAfterMs !== undefined &&
        err.retryAfterMs > 0 &&
        err.retryAfterMs <= LIMITED_PERIOD_MS,
      `retry after ${err.retryAfterMs} ms`,
    );
    assert.match(err.quotaViolations[0]?.description ?? "", /^requests: 1 per/);
    assert.equal(err.trailers["ratelimit-limit"], "1");

    const { client: patient, attempts } = client(KEY_LIMITED);
    const job = await patient.submit(PHOTO, { op: "transform" });
    assert.equal(job.state, JobState.QUEUED);
    // Refused once, then admitted after the server's delay: a client that retried
    // without waiting would have been refused many times over (or a third time if
    // its timer fired a millisecond early).
    assert.ok(attempts.length >= 2 && attempts.length <= 3, `attempts: ${attempts}`);
  });

  test("UNAVAILABLE is retried with backoff, a bounded number of times", async () => {
    const port = await closedPort();
    const { client: nowhere, attempts } = client(
      KEY_A,
      { maxAttempts: 3, initialBackoffMs: 50 },
      `127.0.0.1:${port}`,
    );
    const err = await refusal(nowhere.getJob("jobs/0123456789abcdef0123456789abcdef"));
    assert.equal(err.code, Code.Unavailable);
    assert.deepEqual(attempts, ["GetJob", "GetJob", "GetJob"]);

    const { client: here, attempts: once } = client(KEY_A);
    const missing = await refusal(here.getJob("jobs/0123456789abcdef0123456789abcdef"));
    assert.equal(missing.code, Code.NotFound);
    assert.deepEqual(once, ["GetJob"], "NOT_FOUND is final");
  });
});

/** A loopback port nothing listens on (bound, then closed). */
function closedPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address ? address.port : 0));
    });
  });
}
