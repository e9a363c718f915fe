/** Just enough PNG reading to check an output: the signature and the IHDR chunk. */

export interface PngHeader {
  width: number;
  height: number;
  bitDepth: number;
  /** 6 is truecolour with alpha (RGBA), 4 grey with alpha, 2 RGB, 0 grey, 3 palette. */
  colourType: number;
}

const SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** The IHDR of a PNG (the first chunk, as the spec requires); throws if the bytes are not one. */
export function pngHeader(data: Uint8Array): PngHeader {
  if (data.length < 33 || SIGNATURE.some((b, i) => data[i] !== b)) {
    throw new Error("not a PNG: bad signature");
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const type = new TextDecoder().decode(data.subarray(12, 16));
  if (view.getUint32(8) !== 13 || type !== "IHDR") {
    throw new Error(`not a PNG: first chunk is ${type}, not IHDR`);
  }
  return {
    width: view.getUint32(16),
    height: view.getUint32(20),
    bitDepth: view.getUint8(24),
    colourType: view.getUint8(25),
  };
}
