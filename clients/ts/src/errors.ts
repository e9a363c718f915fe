/**
 * The client's one error type: a failed call with the server's google.rpc details
 * (BadRequest, RetryInfo, QuotaFailure) as typed properties, the way the Python
 * client's `cutout.CutoutError` has them.
 */

import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import type { Status } from "./gen/google/rpc/status_pb.js";

export { Code } from "@connectrpc/connect";

/** google.rpc.BadRequest.FieldViolation: which request field was wrong and why. */
export interface FieldViolation {
  /** Path of the field, for example "submission.image.content". */
  field: string;
  description: string;
}

/** google.rpc.QuotaFailure.Violation: which quota refused the call. */
export interface QuotaViolation {
  /** Whose quota, for example "vendor:acme". */
  subject: string;
  /** Which quota and its size, for example "requests: 50 per 900 s". */
  description: string;
}

/** "RESOURCE_EXHAUSTED" for Code.ResourceExhausted: the name gRPC and the Python client use. */
export function codeName(code: Code): string {
  return (Code[code] ?? "Unknown").replace(/(?<=[a-z])(?=[A-Z])/g, "_").toUpperCase();
}

export class CutoutError extends Error {
  override readonly name = "CutoutError";
  /** The gRPC status code. */
  readonly code: Code;
  /** The server's message, without the code. */
  readonly reason: string;
  /** google.rpc.BadRequest: each field the server refused, and why. */
  readonly violations: FieldViolation[];
  /** google.rpc.QuotaFailure: each quota that refused the call. */
  readonly quotaViolations: QuotaViolation[];
  /** google.rpc.RetryInfo: how long to wait before retrying, when the server said. */
  readonly retryAfterMs: number | undefined;
  /** Trailing metadata such as ratelimit-limit, ratelimit-remaining, ratelimit-reset. */
  readonly trailers: Readonly<Record<string, string>>;

  constructor(
    code: Code,
    reason: string,
    details: {
      violations?: FieldViolation[];
      quotaViolations?: QuotaViolation[];
      retryAfterMs?: number | undefined;
      trailers?: Record<string, string>;
      cause?: unknown;
    } = {},
  ) {
    super(`${codeName(code)}: ${reason}`, { cause: details.cause });
    this.code = code;
    this.reason = reason;
    this.violations = details.violations ?? [];
    this.quotaViolations = details.quotaViolations ?? [];
    this.retryAfterMs = details.retryAfterMs;
    this.trailers = details.trailers ?? {};
  }

  /** RESOURCE_EXHAUSTED with a RetryInfo: a rate limit that says when to come back. */
  get rateLimited(): boolean {
    return this.code === Code.ResourceExhausted && this.retryAfterMs !== undefined;
  }

  /** Any error a call threw, as a CutoutError (a CutoutError is returned as it is). */
  static from(err: unknown): CutoutError {
    if (err instanceof CutoutError) {
      return err;
    }
    const ce = ConnectError.from(err);
    const trailers: Record<string, string> = {};
    ce.metadata.forEach((value, key) => {
      if (!key.endsWith("-bin")) {
        trailers[key] = value;
      }
    });
    const violations = ce
      .findDetails(BadRequestSchema)
      .flatMap((d) => d.fieldViolations.map(fieldViolation));
    const quotaViolations = ce
      .findDetails(QuotaFailureSchema)
      .flatMap((d) => d.violations.map(quotaViolation));
    const delay = ce.findDetails(RetryInfoSchema)[0]?.retryDelay;
    return new CutoutError(ce.code, ce.rawMessage, {
      violations,
      quotaViolations,
      retryAfterMs: delay ? durationMs(delay) : undefined,
      trailers,
      cause: err,
    });
  }

  /** A google.rpc.Status (a refused batch item, a failed job's error) as a CutoutError. */
  static fromStatus(status: Status): CutoutError {
    const violations: FieldViolation[] = [];
    const quotaViolations: QuotaViolation[] = [];
    let retryAfterMs: number | undefined;
    for (const any of status.details) {
      const bad = anyUnpack(any, BadRequestSchema);
      const quota = anyUnpack(any, QuotaFailureSchema);
      const retry = anyUnpack(any, RetryInfoSchema);
      violations.push(...(bad?.fieldViolations.map(fieldViolation) ?? []));
      quotaViolations.push(...(quota?.violations.map(quotaViolation) ?? []));
      if (retry?.retryDelay) {
        retryAfterMs = durationMs(retry.retryDelay);
      }
    }
    const code = status.code in Code ? (status.code as Code) : Code.Unknown;
    return new CutoutError(code, status.message, { violations, quotaViolations, retryAfterMs });
  }
}

function durationMs(d: { seconds: bigint; nanos: number }): number {
  return Number(d.seconds) * 1000 + d.nanos / 1e6;
}

function fieldViolation(v: { field: string; description: string }): FieldViolation {
  return { field: v.field, description: v.description };
}

function quotaViolation(v: { subject: string; description: string }): QuotaViolation {
  return { subject: v.subject, description: v.description };
}
