/**
 * The client in Node: gRPC over HTTP/2 (the gateway directly, or Envoy), or
 * gRPC-Web through Envoy when asked. (Connect's own protocol is not offered: the
 * gateway speaks gRPC only and Envoy does not translate it.)
 */

import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { type ClientOptions, CutoutClient } from "./client.js";

export * from "./index.js";

export interface NodeClientOptions extends Partial<ClientOptions> {
  /** "host:port" (plaintext) or an http(s):// URL; $CUTOUT_ADDR, else 127.0.0.1:50051. */
  address?: string;
  /** "grpc" (default) or "grpc-web" (what Envoy's grpc_web filter speaks). */
  protocol?: "grpc" | "grpc-web";
}

/** "127.0.0.1:50051" -> "http://127.0.0.1:50051"; URLs stay as they are. */
export function baseUrl(address: string): string {
  return /^https?:\/\//.test(address) ? address : `http://${address}`;
}

/** A Connect transport to `address`; interceptors see every attempt of every call. */
export function nodeTransport(
  address: string,
  protocol: NodeClientOptions["protocol"] = "grpc",
  interceptors: Interceptor[] = [],
): Transport {
  const options = { baseUrl: baseUrl(address), httpVersion: "2" as const, interceptors };
  if (protocol === "grpc-web") {
    return createGrpcWebTransport(options);
  }
  return createGrpcTransport(options);
}

/** A client for Node; address and key default to $CUTOUT_ADDR and $CUTOUT_API_KEY, as the Python client's do. */
export function createNodeClient(options: NodeClientOptions = {}): CutoutClient {
  const address = options.address ?? process.env.CUTOUT_ADDR ?? "127.0.0.1:50051";
  const apiKey = options.apiKey ?? process.env.CUTOUT_API_KEY ?? "";
  return new CutoutClient(nodeTransport(address, options.protocol), { ...options, apiKey });
}
