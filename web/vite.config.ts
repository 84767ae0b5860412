import { defineConfig } from "vite";

// Built into the control plane's package, which serves it at / (wrenn_control/web.py).
export default defineConfig({
  base: "/",
  build: {
    outDir: "../src/wrenn_control/dashboard",
    emptyOutDir: true,
    chunkSizeWarningLimit: 1000,
  },
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  server: { proxy: { "/api": { target: "http://127.0.0.1:8080", ws: true } } },
});
