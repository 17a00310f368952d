// Bundle web/src into aetherd/transport/console_dist (run by web/webbuild.py, `npm run build`).
// The stamp's digest must equal webbuild.py's inputs_digest(): same files, same order.
import { createHash } from "node:crypto";
import { gzipSync, constants as zlib } from "node:zlib";
import { mkdirSync, readFileSync, readdirSync, statSync, writeFileSync, copyFileSync, existsSync } from "node:fs";
import { join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const WEB = fileURLToPath(new URL(".", import.meta.url));
const OUT = join(WEB, "..", "aetherd", "transport", "console_dist");
const INPUT_FILES = ["build.mjs", "package.json", "package-lock.json", "tsconfig.json"];

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? walk(path) : [path];
  });
}

function inputsDigest() {
  const files = INPUT_FILES.map((n) => join(WEB, n)).filter((p) => existsSync(p));
  files.push(...walk(join(WEB, "src")));
  const rel = (p) => relative(WEB, p).split(sep).join("/");
  files.sort((a, b) => (rel(a) < rel(b) ? -1 : rel(a) > rel(b) ? 1 : 0));
  const hash = createHash("sha256");
  for (const path of files) {
    hash.update(Buffer.concat([Buffer.from(rel(path) + "\0"), readFileSync(path), Buffer.from("\0")]));
  }
  return hash.digest("hex");
}

const digest = inputsDigest();
mkdirSync(OUT, { recursive: true });
await esbuild.build({
  entryPoints: { app: join(WEB, "src", "main.ts") },
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2022"],
  outdir: OUT,
  legalComments: "linked",
  logLevel: "warning",
});
copyFileSync(join(WEB, "src", "index.html"), join(OUT, "index.html"));
// Precompressed copies: aiohttp's FileResponse sends app.js.gz to a client that accepts gzip.
for (const name of ["app.js", "app.css"]) {
  const data = readFileSync(join(OUT, name));
  writeFileSync(join(OUT, `${name}.gz`), gzipSync(data, { level: zlib.Z_BEST_COMPRESSION }));
}
writeFileSync(join(OUT, "stamp.json"), JSON.stringify({ inputs: digest }) + "\n");
