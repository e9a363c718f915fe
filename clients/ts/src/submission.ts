/**
 * One JobSubmission from plain options: the same names and defaults as the Python
 * client's `build_submission` and the `cutout submit` flags.
 */

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  type Color,
  ColorSchema,
  FaceCropMode,
  type JobSubmission,
  JobSubmissionSchema,
  type OperationSchema,
  OutputFormat,
  ResizeMode,
} from "./gen/cutout/v1/jobs_pb.js";

/** Bytes are sent as they are (a Node Buffer is a Uint8Array); a string or URL is fetched by the gateway. */
export type ImageInput = Uint8Array | ArrayBuffer | Blob | URL | string;

export type OperationName = "remove-bg" | "crop-face" | "transform";
export type FormatName = "png" | "webp" | "jpeg";

export interface SubmitOptions {
  /** What to do: "remove-bg" (default), "crop-face" or "transform" (a light job). */
  op?: OperationName;
  /** remove-bg: model from the cluster's catalogue; the cluster's default when empty. */
  model?: string;
  /** Output encoding; "png" by default. */
  format?: FormatName;
  /** remove-bg: return the 8-bit mask instead of the cutout. */
  maskOnly?: boolean;
  /** remove-bg: paint this colour ("RRGGBB" or "RRGGBBAA", # optional) behind the subject. */
  background?: string;
  /** remove-bg: crop to the subject's box plus `margin` pixels (0-1000). */
  cropToSubject?: boolean;
  margin?: number;
  /** remove-bg: refine the edge with alpha matting (slower; hair and fur). */
  alphaMatting?: boolean;
  /** crop-face: "passport" (default), "id-card" or "square". */
  mode?: "passport" | "id-card" | "square";
  /** transform: "fit", "fill" or "" (keep the size), into width x height pixels. */
  resize?: "" | "fit" | "fill";
  width?: number;
  height?: number;
  /** transform: JPEG/WebP quality 1-100; 0 means the default. */
  quality?: number;
  /** 0 (default) to 9; higher runs first within your own queue. */
  priority?: number;
  /** Idempotency key; a random one when not given, so a retried submit never makes a second job. */
  clientKey?: string;
  /** A row in your database the result should be written to. */
  record?: { projectId: string; recordId: string };
  /** https URL notified when the job finishes, instead of your registered webhook endpoint. */
  webhookUrl?: string;
}

const FORMATS: Record<FormatName, OutputFormat> = {
  png: OutputFormat.PNG,
  webp: OutputFormat.WEBP,
  jpeg: OutputFormat.JPEG,
};
const FACE_MODES = {
  passport: FaceCropMode.PASSPORT,
  "id-card": FaceCropMode.ID_CARD,
  square: FaceCropMode.SQUARE,
} as const;
const RESIZE_MODES = {
  "": ResizeMode.UNSPECIFIED,
  fit: ResizeMode.FIT,
  fill: ResizeMode.FILL,
} as const;

/** "RRGGBB" or "RRGGBBAA" (a leading # is fine) as a Color. */
export function parseColor(text: string): Color {
  const raw = text.replace(/^#/, "");
  if (!/^([0-9a-fA-F]{6}|[0-9a-fA-F]{8})$/.test(raw)) {
    throw new RangeError(`colour ${JSON.stringify(text)} is not RRGGBB or RRGGBBAA hex`);
  }
  const part = (i: number) => Number.parseInt(raw.slice(2 * i, 2 * i + 2), 16);
  return create(ColorSchema, {
    red: part(0),
    green: part(1),
    blue: part(2),
    alpha: raw.length === 8 ? part(3) : 255,
  });
}

/** 32 random hex characters, from the Web Crypto API (Node 20 and every browser, secure context or not). */
export function randomKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function operation(options: SubmitOptions): MessageInitShape<typeof OperationSchema> {
  const format = FORMATS[options.format ?? "png"];
  if (format === undefined) {
    throw new RangeError(`output format ${options.format}: use one of png, webp, jpeg`);
  }
  const op = options.op ?? "remove-bg";
  if (op === "remove-bg") {
    return {
      kind: {
        case: "removeBackground",
        value: {
          model: options.model ?? "",
          format,
          maskOnly: options.maskOnly ?? false,
          backgroundColor: options.background ? parseColor(options.background) : undefined,
          cropToSubject: options.cropToSubject ?? false,
          cropMarginPx: options.margin ?? 0,
          alphaMatting: options.alphaMatting ?? false,
        },
      },
    };
  }
  if (op === "crop-face") {
    const mode = FACE_MODES[options.mode ?? "passport"];
    if (mode === undefined) {
      throw new RangeError(`face crop mode ${options.mode}: use passport, id-card or square`);
    }
    return { kind: { case: "cropFace", value: { mode, format } } };
  }
  if (op === "transform") {
    const resize = RESIZE_MODES[options.resize ?? ""];
    if (resize === undefined) {
      throw new RangeError(`resize ${options.resize}: use fit, fill or ""`);
    }
    return {
      kind: {
        case: "transform",
        value: {
          resize,
          widthPx: options.width ?? 0,
          heightPx: options.height ?? 0,
          format,
          quality: options.quality ?? 0,
        },
      },
    };
  }
  throw new RangeError(`operation ${op}: use remove-bg, crop-face or transform`);
}

/** Image bytes or an https URL as the submission's source (reads a Blob's bytes). */
export async function imageSource(
  image: ImageInput,
): Promise<{ case: "content"; value: Uint8Array } | { case: "uri"; value: string }> {
  if (typeof image === "string" || image instanceof URL) {
    const uri = image.toString();
    if (!/^https?:\/\//.test(uri)) {
      throw new RangeError(`image ${JSON.stringify(uri)}: give bytes, a Blob or an http(s) URL`);
    }
    return { case: "uri", value: uri };
  }
  if (image instanceof Uint8Array) {
    return { case: "content", value: image };
  }
  if (image instanceof ArrayBuffer) {
    return { case: "content", value: new Uint8Array(image) };
  }
  return { case: "content", value: new Uint8Array(await image.arrayBuffer()) };
}

export async function buildSubmission(
  image: ImageInput,
  options: SubmitOptions = {},
): Promise<JobSubmission> {
  return create(JobSubmissionSchema, {
    image: { source: await imageSource(image) },
    operation: operation(options),
    priority: options.priority ?? 0,
    clientKey: options.clientKey || randomKey(),
    record: options.record,
    webhookUrl: options.webhookUrl ?? "",
  });
}
