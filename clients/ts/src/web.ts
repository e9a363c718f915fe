/** The client in browsers: gRPC-Web (through Envoy's grpc_web filter, which also answers CORS). */

import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { type ClientOptions, CutoutClient } from "./client.js";

export * from "./index.js";

export interface WebClientOptions extends ClientOptions {
  /** Envoy's address, for example "http://127.0.0.1:8080". */
  baseUrl: string;
}

export function createWebClient(options: WebClientOptions): CutoutClient {
  return new CutoutClient(createGrpcWebTransport({ baseUrl: options.baseUrl }), options);
}
