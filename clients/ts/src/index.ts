/**
 * cutout-client: the Cutout API for TypeScript. This entry point runs anywhere (Node
 * and browsers); pick a transport with `cutout-client/node` (gRPC over HTTP/2) or
 * `cutout-client/web` (gRPC-Web through Envoy).
 */

export { create } from "@bufbuild/protobuf";
export {
  type CallControl,
  type ClientOptions,
  CutoutClient,
  type JobResult,
  type ListJobsOptions,
} from "./client.js";
export { Code, CutoutError, codeName, type FieldViolation, type QuotaViolation } from "./errors.js";
export * from "./gen/cutout/v1/cutout_service_pb.js";
export * from "./gen/cutout/v1/jobs_pb.js";
export * from "./gen/cutout/v1/webhooks_pb.js";
export type { Status } from "./gen/google/rpc/status_pb.js";
export {
  buildSubmission,
  type FormatName,
  type ImageInput,
  imageSource,
  type OperationName,
  parseColor,
  randomKey,
  type SubmitOptions,
} from "./submission.js";
export {
  verifyWebhook,
  type WebhookEvent,
  WebhookVerificationError,
  webhookSignature,
} from "./webhooks.js";
