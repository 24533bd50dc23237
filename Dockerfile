# syntax=docker/dockerfile:1
# ohmygpt-gateway: build with `docker build -t ohmygpt-gateway .`, run with
#   docker run --rm -p 8080:8080 -e OHMYGPT_API_KEY ohmygpt-gateway
# The config is baked in at /app/config/gateway.yaml; mount your own directory over /app/config read-only
# (-v "$PWD/config:/app/config:ro"; the directory, not the file, so that a SIGHUP reload sees an edited file),
# or point GATEWAY_CONFIG at a file in a mounted directory.

# ---- build: compile TypeScript to dist/ ----
FROM node:24-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build

# ---- runtime: production dependencies, compiled code and the example config only ----
FROM node:24-slim
ENV NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && npm cache clean --force \
 && mkdir -p /app/audit \
 && chown node:node /app/audit
COPY --from=build /src/dist ./dist
COPY config ./config
# Audit JSONL goes to ./audit/audit.jsonl (relative to /app) unless AUDIT_FILE or the config says otherwise.
VOLUME ["/app/audit"]
USER node
EXPOSE 8080
# No curl in the image: probe /healthz with Node's fetch (follows GATEWAY_PORT if you change it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.GATEWAY_PORT||8080)+'/healthz',{signal:AbortSignal.timeout(4000)}).then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
# Exec form: node is PID 1 and gets signals directly. `docker stop` (SIGTERM) runs the bounded drain:
# shutdown.drainDelayMs (0) + shutdown.graceMs (30 s), then the audit flush; give it drainDelayMs + graceMs + 15 s
# (`--stop-timeout 45` / compose `stop_grace_period: 45s`; Docker's default is 10 s).
# `docker kill -s HUP` reloads the config without a restart.
CMD ["node", "dist/cli.js", "start"]
