/** What the page says about a job and about an error, in words a person can act on. */

import { Code, type CutoutError, type Job, JobState, Stage } from "cutout-client/web";

const STAGES: Partial<Record<Stage, string>> = {
  [Stage.QUEUED]: "waiting",
  [Stage.DECODING]: "reading the image",
  [Stage.INFERENCE]: "finding the subject",
  [Stage.COMPOSITING]: "cutting it out",
  [Stage.ENCODING]: "encoding",
  [Stage.STORING]: "storing",
  [Stage.DONE]: "done",
  [Stage.DETECTING]: "finding the face",
  [Stage.RESIZING]: "resizing",
};

export function stageName(stage: Stage): string {
  return STAGES[stage] ?? "working";
}

function ordinal(n: number): string {
  const tens = n % 100;
  const suffix = tens >= 11 && tens <= 13 ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] ?? "th");
  return `${n}${suffix}`;
}

export function duration(ms: number): string {
  const s = Math.max(1, Math.round(ms / 1000));
  if (s < 90) return `${s} s`;
  const min = Math.round(s / 60);
  return min < 90 ? `${min} min` : `${Math.round(min / 60)} h`;
}

/** One line for the job's state: "Queued · 3rd in line · about 12 s", "Running · finding the subject · 40 %". */
export function describeJob(job: Job): string {
  switch (job.state) {
    case JobState.QUEUED: {
      const parts = ["Queued"];
      if (job.queuePosition > 0n) parts.push(`${ordinal(Number(job.queuePosition))} in line`);
      const wait = job.estimatedWait;
      if (wait) parts.push(`about ${duration(Number(wait.seconds) * 1000 + wait.nanos / 1e6)}`);
      if (job.retryTime) parts.push("retrying after a failed attempt");
      return parts.join(" · ");
    }
    case JobState.RUNNING:
      return `Running · ${stageName(job.stage)} · ${job.progressPercent} %`;
    case JobState.SUCCEEDED:
      return "Done";
    case JobState.FAILED:
      return "Failed";
    case JobState.CANCELLED:
      return "Cancelled";
    default:
      return "Sent";
  }
}

export function bytes(n: number): string {
  if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1)} MB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KB`;
  return `${n} bytes`;
}

/** An image the server refused, from its BadRequest field description. */
function imageProblem(description: string, size: number): string {
  const tooBig = /is (\d+) bytes; the limit is (\d+)/.exec(description);
  if (tooBig) {
    return `Too large: ${bytes(Number(tooBig[1]))}; the limit is ${bytes(Number(tooBig[2]))}. Resize or compress it and drop it again.`;
  }
  if (/not an image/.test(description)) {
    return "Not an image Cutout can read: use a JPEG, PNG, WebP, GIF, BMP or TIFF file.";
  }
  if (/pixels/.test(description)) {
    return `Too many pixels (${description}). Scale it down and drop it again.`;
  }
  return `This image was refused: ${description} (${bytes(size)}).`;
}

export interface Explained {
  text: string;
  /** When set, the page retries by itself after this many milliseconds. */
  retryInMs?: number;
  /** Whether retrying as it is can help (false: the file or the key must change). */
  retryable: boolean;
}

/** A failed call, in words. */
export function explain(err: CutoutError, size: number): Explained {
  switch (err.code) {
    case Code.InvalidArgument: {
      const image = err.violations.find((v) => v.field.endsWith("image.content"));
      if (image) return { text: imageProblem(image.description, size), retryable: false };
      const fields = err.violations.map((v) => `${v.field}: ${v.description}`).join("; ");
      return { text: `Refused: ${fields || err.reason}`, retryable: false };
    }
    case Code.ResourceExhausted: {
      const quota = err.quotaViolations[0]?.description;
      if (err.retryAfterMs !== undefined) {
        // A quota names itself (QuotaFailure); a full queue says why in its message.
        const why = quota ? `Rate limit reached (${quota})` : `Cutout is busy: ${err.reason}`;
        return {
          text: `${why}. Retrying in ${duration(err.retryAfterMs)}.`,
          retryInMs: err.retryAfterMs,
          retryable: true,
        };
      }
      if (/larger than/.test(err.reason)) {
        return { text: `Too large to send (${bytes(size)}): ${err.reason}.`, retryable: false };
      }
      return { text: `Refused for now: ${err.reason}. Try again later.`, retryable: true };
    }
    case Code.Unauthenticated:
      return { text: "The API key was not accepted. Check it above and retry.", retryable: true };
    case Code.PermissionDenied:
      return { text: "This account is disabled. Ask your Cutout operator.", retryable: false };
    case Code.Unavailable:
      return {
        text: "Cutout cannot be reached right now. Check your connection and retry.",
        retryable: true,
      };
    case Code.NotFound:
      return { text: "This job no longer exists (results are kept for 7 days).", retryable: false };
    default:
      return { text: `Something went wrong: ${err.message}`, retryable: true };
  }
}
