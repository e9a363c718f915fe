// Bundles the page into dist/: app.js (the TS client, Connect-Web and fflate
// included), app.css and index.html. No server of its own: Envoy is the API, and
// `cutout-admin up` (services/local/webpage.py) serves these files.
import { copyFile, mkdir } from "node:fs/promises";
import { build } from "esbuild";

await mkdir("dist", { recursive: true });
await build({
  entryPoints: ["src/main.ts"],
  bundle: true,
  format: "esm",
  target: ["es2022"],
  minify: true,
  sourcemap: true,
  outfile: "dist/app.js",
  logLevel: "warning",
});
await copyFile("src/style.css", "dist/app.css");
await copyFile("index.html", "dist/index.html");
await copyFile("favicon.svg", "dist/favicon.svg");
