/**
 * The Cutout client: the shape of the Python `cutout.AsyncClient` over any Connect
 * transport (gRPC over HTTP/2 in Node: `cutout-client/node`; gRPC-Web in browsers:
 * `cutout-client/web`).
 *
 *     const client = createNodeClient({ address: "127.0.0.1:50051", apiKey });
 *     const job = await client.submit(await readFile("photo.jpg"));
 *     for await (const event of client.watch(job.name)) console.log(event.job?.progressPercent);
 *     const { data } = await client.getResult(job.name);
 *
 * Retries: a RESOURCE_EXHAUSTED that carries a RetryInfo is retried after the delay
 * the server gave, while the waits add up to at most `rateLimitWaitMs`; UNAVAILABLE
 * is retried with exponential backoff and full jitter (gRPC's retry policy, the one
 * the Python client sets in its service config). Every call this client makes is
 * safe to repeat: reads and watches have no side effects, submits always carry a
 * client key (a repeat returns the first job) and cancelling twice is cancelling once.
 */

import { toBinary } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import {
  type CallOptions,
  type Client,
  Code,
  createClient,
  type Transport,
} from "@connectrpc/connect";
import { CutoutError } from "./errors.js";
import {
  CutoutService,
  type ListJobsResponse,
  type ListWebhookDeliveriesResponse,
  type SubmitBatchResponse,
  type SubmitJobResponse,
} from "./gen/cutout/v1/cutout_service_pb.js";
import {
  type Job,
  type JobEvent,
  JobEventSchema,
  JobState,
  type JobSubmission,
  JobSubmissionSchema,
  type Result,
} from "./gen/cutout/v1/jobs_pb.js";
import type { WebhookDelivery } from "./gen/cutout/v1/webhooks_pb.js";
import { buildSubmission, type ImageInput, type SubmitOptions } from "./submission.js";

export interface ClientOptions {
  /** The vendor's API key, sent as `authorization: Bearer <key>`. */
  apiKey: string;
  /** Deadline of each unary call (watches have none); 30 s by default. */
  timeoutMs?: number;
  /** How long rate-limited calls may wait in total, as the server says; 300 s by default, 0 never waits. */
  rateLimitWaitMs?: number;
  /** Attempts of a call that keeps meeting UNAVAILABLE, the first included; 5 by default. */
  maxAttempts?: number;
  /** First UNAVAILABLE backoff, doubling up to maxBackoffMs; 200 ms and 3 s by default. */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
}

/** A page of jobs, newest first. */
export interface ListJobsOptions {
  /** Only jobs in this state; every state when unspecified. */
  state?: JobState;
  /** 1-500; 50 when 0. */
  pageSize?: number;
  pageToken?: string;
}

/** A succeeded job's output: its description and its bytes. */
export interface JobResult {
  result: Result;
  /** The encoded image, in its own ArrayBuffer: `new Blob([data], { type: result.contentType })`
   * in a browser, `Buffer.from(data.buffer)` (no copy) in Node. */
  data: Uint8Array<ArrayBuffer>;
}

/** Per-call options. */
export interface CallControl {
  signal?: AbortSignal;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const done = () => {
      signal?.removeEventListener("abort", abort);
      resolve();
    };
    const timer = setTimeout(done, ms);
    const abort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", abort, { once: true });
  });
}

function concat(chunks: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

function nanos(t: Timestamp | undefined): bigint {
  return t ? t.seconds * 1_000_000_000n + BigInt(t.nanos) : 0n;
}

export class CutoutClient {
  /** The generated Connect client, for the methods this class does not wrap (stats, batches, dead letters). */
  readonly rpc: Client<typeof CutoutService>;
  private readonly headers: Record<string, string>;
  private readonly timeoutMs: number;
  private readonly rateLimitWaitMs: number;
  private readonly maxAttempts: number;
  private readonly initialBackoffMs: number;
  private readonly maxBackoffMs: number;

  constructor(transport: Transport, options: ClientOptions) {
    if (!options.apiKey) {
      throw new CutoutError(Code.Unauthenticated, "no API key: pass apiKey");
    }
    this.rpc = createClient(CutoutService, transport);
    this.headers = { authorization: `Bearer ${options.apiKey}` };
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.rateLimitWaitMs = options.rateLimitWaitMs ?? 300_000;
    this.maxAttempts = Math.max(1, options.maxAttempts ?? 5);
    this.initialBackoffMs = options.initialBackoffMs ?? 200;
    this.maxBackoffMs = options.maxBackoffMs ?? 3_000;
  }

  /** Submit one image; returns the queued job (or the earlier one its client key names). */
  async submit(
    image: ImageInput,
    options: SubmitOptions = {},
    control: CallControl = {},
  ): Promise<Job> {
    const submission = await buildSubmission(image, options);
    const reply = await this.submitSubmission(submission, control);
    if (!reply.job) {
      throw new CutoutError(Code.Internal, "SubmitJob answered without a job");
    }
    return reply.job;
  }

  /** Submit a prepared JobSubmission; the whole response (job, deduplicated). */
  submitSubmission(
    submission: JobSubmission,
    control: CallControl = {},
  ): Promise<SubmitJobResponse> {
    return this.unary(control, (o) => this.rpc.submitJob({ submission }, o));
  }

  /**
   * Submit up to 1000 images (or prepared submissions) in one call. Each item is
   * accepted or refused on its own: see `outcomes`, and `CutoutError.fromStatus`
   * for a refused item's reason.
   */
  async submitBatch(
    items: ReadonlyArray<ImageInput | JobSubmission>,
    options: SubmitOptions = {},
    control: CallControl = {},
  ): Promise<SubmitBatchResponse> {
    const submissions = await Promise.all(
      items.map((item) => (isSubmission(item) ? item : buildSubmission(item, options))),
    );
    const webhookUrl = options.webhookUrl ?? "";
    return this.unary(control, (o) => this.rpc.submitBatch({ submissions, webhookUrl }, o));
  }

  /** Webhook deliveries of your jobs and batches, newest first. */
  listWebhookDeliveries(
    options: { pageSize?: number; pageToken?: string } = {},
    control: CallControl = {},
  ): Promise<ListWebhookDeliveriesResponse> {
    const request = { pageSize: options.pageSize ?? 50, pageToken: options.pageToken ?? "" };
    return this.unary(control, (o) => this.rpc.listWebhookDeliveries(request, o));
  }

  async getWebhookDelivery(name: string, control: CallControl = {}): Promise<WebhookDelivery> {
    const reply = await this.unary(control, (o) => this.rpc.getWebhookDelivery({ name }, o));
    if (!reply.delivery) {
      throw new CutoutError(Code.Internal, "GetWebhookDelivery answered without a delivery");
    }
    return reply.delivery;
  }

  /** Send a delivery again now, with the same webhook-id. */
  async redeliverWebhook(name: string, control: CallControl = {}): Promise<WebhookDelivery> {
    const reply = await this.unary(control, (o) => this.rpc.redeliverWebhook({ name }, o));
    if (!reply.delivery) {
      throw new CutoutError(Code.Internal, "RedeliverWebhook answered without a delivery");
    }
    return reply.delivery;
  }

  async getJob(name: string, control: CallControl = {}): Promise<Job> {
    const reply = await this.unary(control, (o) => this.rpc.getJob({ name }, o));
    if (!reply.job) {
      throw new CutoutError(Code.Internal, "GetJob answered without a job");
    }
    return reply.job;
  }

  listJobs(options: ListJobsOptions = {}, control: CallControl = {}): Promise<ListJobsResponse> {
    const request = {
      state: options.state ?? JobState.UNSPECIFIED,
      pageSize: options.pageSize ?? 50,
      pageToken: options.pageToken ?? "",
    };
    return this.unary(control, (o) => this.rpc.listJobs(request, o));
  }

  /** Cancel a job that is not done yet; returns it afterwards (unchanged when it was done). */
  async cancel(name: string, control: CallControl = {}): Promise<Job> {
    const reply = await this.unary(control, (o) => this.rpc.cancelJob({ name }, o));
    if (!reply.job) {
      throw new CutoutError(Code.Internal, "CancelJob answered without a job");
    }
    return reply.job;
  }

  /** The output of a SUCCEEDED job, its chunks joined. */
  getResult(name: string, control: CallControl = {}): Promise<JobResult> {
    return this.unary(control, async (o) => {
      let result: Result | undefined;
      const chunks: Uint8Array[] = [];
      for await (const reply of this.rpc.getResult({ name }, o)) {
        result ??= reply.result;
        chunks.push(reply.chunk);
      }
      if (!result) {
        throw new CutoutError(Code.Internal, "GetResult answered without a result");
      }
      return { result, data: concat(chunks) };
    });
  }

  /**
   * Every change to the job until it is done; the first event is its state now.
   * If the connection drops (UNAVAILABLE) the watch reconnects with backoff; the
   * server replays the job's history, and events already yielded are skipped.
   */
  async *watch(name: string, control: CallControl = {}): AsyncGenerator<JobEvent, void, undefined> {
    let lastTime = -1n;
    let seenAtLast = new Set<string>();
    let failures = 0;
    for (;;) {
      try {
        const options: CallOptions = { headers: this.headers, signal: control.signal };
        for await (const reply of this.rpc.watchJob({ name }, options)) {
          const event = reply.event;
          if (!event) {
            continue;
          }
          failures = 0;
          // Snapshots are ordered by time; equal times are told apart by content.
          const time = nanos(event.eventTime);
          const id = toBinary(JobEventSchema, event).join(",");
          if (time < lastTime || (time === lastTime && seenAtLast.has(id))) {
            continue;
          }
          if (time > lastTime) {
            lastTime = time;
            seenAtLast = new Set();
          }
          seenAtLast.add(id);
          yield event;
        }
        return;
      } catch (e) {
        const err = CutoutError.from(e);
        failures += 1;
        if (err.code !== Code.Unavailable || failures >= this.maxAttempts) {
          throw err;
        }
        await sleep(this.backoff(failures), control.signal);
      }
    }
  }

  /** Watch until done; the job's last snapshot. */
  async wait(name: string, control: CallControl = {}): Promise<Job> {
    let last: Job | undefined;
    for await (const event of this.watch(name, control)) {
      last = event.job;
    }
    return last ?? this.getJob(name, control);
  }

  /** Full jitter: a uniformly random wait below the doubled backoff, as gRPC's retry policy does. */
  private backoff(attempt: number): number {
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** (attempt - 1));
    return Math.random() * ceiling;
  }

  /** One call with its deadline and key, retried on rate limits and UNAVAILABLE (see the module doc). */
  private async unary<T>(
    control: CallControl,
    call: (options: CallOptions) => Promise<T>,
  ): Promise<T> {
    let waitedMs = 0;
    let attempts = 0;
    for (;;) {
      try {
        return await call({
          headers: this.headers,
          timeoutMs: this.timeoutMs,
          signal: control.signal,
        });
      } catch (e) {
        const err = CutoutError.from(e);
        let delay: number | undefined;
        if (err.rateLimited && waitedMs + (err.retryAfterMs ?? 0) <= this.rateLimitWaitMs) {
          delay = err.retryAfterMs ?? 0;
          waitedMs += delay;
        } else if (err.code === Code.Unavailable && ++attempts < this.maxAttempts) {
          delay = this.backoff(attempts);
        }
        if (delay === undefined) {
          throw err;
        }
        await sleep(delay, control.signal);
      }
    }
  }
}

function isSubmission(item: ImageInput | JobSubmission): item is JobSubmission {
  return (item as { $typeName?: string }).$typeName === JobSubmissionSchema.typeName;
}
