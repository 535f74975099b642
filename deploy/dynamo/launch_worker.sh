#!/usr/bin/env bash
# Start an `lmcache server` sidecar with the memkv L2 adapter, wait until it answers on
# its admin port, then run an inference worker next to it (Dynamo's vLLM worker by
# default). Signals go to the worker first; the sidecar is stopped after the worker has
# exited, so stores still in flight reach MemKV. If either process dies, the other is
# stopped and the script exits with the worker's status (or the sidecar's, if it died
# first), so a supervisor restarts the pair.
#
# Usage:
#   MEMKV_SERVERS=mem1:9901,mem2:9901 MEMKV_AUTH_KEY_FILE=/etc/memkv/auth-key MODEL=Qwen/Qwen3-0.6B \
#     deploy/dynamo/launch_worker.sh
#   deploy/dynamo/launch_worker.sh -- vllm serve Qwen/Qwen3-0.6B --kv-transfer-config "$CFG"
#
# Environment (all optional unless noted):
#   MEMKV_SERVERS, MEMKV_AUTH_KEY_FILE, MEMKV_CONFIG, MEMKV_REPLICAS, MEMKV_PREFIX,
#   MEMKV_TRANSPORT, ...   read by the memkv adapter inside the sidecar (passed through).
#                          MEMKV_SERVERS or MEMKV_CONFIG is required.
#   MEMKV_AUTH_KEY_FILE    file holding the 64-hex key (`memkv keygen`); keep it mode 0600.
#   MEMKV_AUTH_KEY         accepted, but never handed to the sidecar: LMCache's admin port
#                          answers `GET /env` with the environment, unauthenticated. The
#                          script moves the key into a private file (MEMKV_AUTH_KEY_FILE)
#                          that it deletes on exit.
#   MODEL                  model for the default worker command (required without "--").
#   LMCACHE_HOST           sidecar ZMQ host               (default 127.0.0.1)
#   LMCACHE_PORT           sidecar ZMQ port               (default 5555)
#   LMCACHE_HTTP_HOST      sidecar admin host             (default 127.0.0.1)
#   LMCACHE_HTTP_PORT      sidecar admin port, /metrics + /status (default 8080)
#   LMCACHE_L1_SIZE_GB     sidecar L1 pool size           (default 20)
#   LMCACHE_EVICTION_POLICY  L1 eviction policy           (default LRU)
#   LMCACHE_TRANSFER_MODE  --supported-transfer-mode      (default auto: serves both
#                          lmcache-driven GPU workers and engine-driven ones, which is
#                          what vLLM's CPU build and the engine_driven connector use;
#                          LMCache's own default, lmcache_driven, leaves those hanging)
#   LMCACHE_L2_ADAPTER     --l2-adapter JSON              (default {"type":"memkv"})
#   LMCACHE_SERVER_ARGS    extra `lmcache server` flags, split on whitespace
#   LMCACHE_BIN            the lmcache command            (default lmcache)
#   KV_TRANSFER_CONFIG     vLLM --kv-transfer-config      (default: LMCacheMPConnector
#                          pointed at LMCACHE_HOST:LMCACHE_PORT)
#   SIDECAR_WAIT_S         seconds to wait for the sidecar (default 300)
#   STOP_TIMEOUT_S         seconds a process gets after SIGTERM before SIGKILL (default 30)
set -euo pipefail

log() { printf '%s launch_worker: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

LMCACHE_BIN="${LMCACHE_BIN:-lmcache}"
LMCACHE_HOST="${LMCACHE_HOST:-127.0.0.1}"
LMCACHE_PORT="${LMCACHE_PORT:-5555}"
LMCACHE_HTTP_HOST="${LMCACHE_HTTP_HOST:-127.0.0.1}"
LMCACHE_HTTP_PORT="${LMCACHE_HTTP_PORT:-8080}"
LMCACHE_L1_SIZE_GB="${LMCACHE_L1_SIZE_GB:-20}"
LMCACHE_EVICTION_POLICY="${LMCACHE_EVICTION_POLICY:-LRU}"
LMCACHE_TRANSFER_MODE="${LMCACHE_TRANSFER_MODE:-auto}"
default_l2_adapter='{"type":"memkv"}'
LMCACHE_L2_ADAPTER="${LMCACHE_L2_ADAPTER:-${default_l2_adapter}}"
LMCACHE_SERVER_ARGS="${LMCACHE_SERVER_ARGS:-}"
SIDECAR_WAIT_S="${SIDECAR_WAIT_S:-300}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"

if [[ -z "${MEMKV_SERVERS:-}" && -z "${MEMKV_CONFIG:-}" ]]; then
    die "set MEMKV_SERVERS (node control endpoints, e.g. mem1:9901,mem2:9901) or MEMKV_CONFIG"
fi
if [[ -n "${MEMKV_CONFIG:-}" && ! -r "${MEMKV_CONFIG}" ]]; then
    die "MEMKV_CONFIG=${MEMKV_CONFIG} is not a readable file"
fi
if [[ -n "${MEMKV_AUTH_KEY_FILE:-}" && ! -r "${MEMKV_AUTH_KEY_FILE}" ]]; then
    die "MEMKV_AUTH_KEY_FILE=${MEMKV_AUTH_KEY_FILE} is not a readable file"
fi
for name in LMCACHE_PORT LMCACHE_HTTP_PORT SIDECAR_WAIT_S STOP_TIMEOUT_S; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || die "${name} must be a whole number, got '${!name}'"
done

# The worker command: everything after "--", else Dynamo's vLLM worker.
if [[ "${1:-}" == "--" ]]; then
    shift
fi
if (($# > 0)); then
    worker_cmd=("$@")
else
    [[ -n "${MODEL:-}" ]] || die "set MODEL, or pass the worker command after --"
    connector_host="${LMCACHE_HOST}"
    [[ "${connector_host}" == *"://"* ]] || connector_host="tcp://${connector_host}"
    if [[ -z "${KV_TRANSFER_CONFIG:-}" ]]; then
        printf -v KV_TRANSFER_CONFIG '{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both",%s}' \
            "$(printf '"kv_connector_extra_config":{"lmcache.mp.host":"%s","lmcache.mp.port":%s}' \
                "${connector_host}" "${LMCACHE_PORT}")"
    fi
    worker_cmd=(python3 -m dynamo.vllm --model "${MODEL}" --kv-transfer-config "${KV_TRANSFER_CONFIG}")
fi

extra_args=()
if [[ -n "${LMCACHE_SERVER_ARGS}" ]]; then
    read -r -a extra_args <<<"${LMCACHE_SERVER_ARGS}"
fi
sidecar_cmd=(
    "${LMCACHE_BIN}" server
    --host "${LMCACHE_HOST}"
    --port "${LMCACHE_PORT}"
    --http-host "${LMCACHE_HTTP_HOST}"
    --http-port "${LMCACHE_HTTP_PORT}"
    --l1-size-gb "${LMCACHE_L1_SIZE_GB}"
    --eviction-policy "${LMCACHE_EVICTION_POLICY}"
    --supported-transfer-mode "${LMCACHE_TRANSFER_MODE}"
    --l2-adapter "${LMCACHE_L2_ADAPTER}"
    ${extra_args[@]+"${extra_args[@]}"}
)

# Keep the key out of every child's environment (the sidecar's /env would show it).
key_tmpdir=""
if [[ -n "${MEMKV_AUTH_KEY:-}" ]]; then
    if [[ -z "${MEMKV_AUTH_KEY_FILE:-}" ]]; then
        key_tmpdir="$(mktemp -d)"
        (umask 077 && printf '%s\n' "${MEMKV_AUTH_KEY}" >"${key_tmpdir}/auth-key")
        export MEMKV_AUTH_KEY_FILE="${key_tmpdir}/auth-key"
        log "moved MEMKV_AUTH_KEY into a private file; prefer MEMKV_AUTH_KEY_FILE"
    else
        log "MEMKV_AUTH_KEY ignored: MEMKV_AUTH_KEY_FILE is set"
    fi
    unset MEMKV_AUTH_KEY
fi

sidecar_pid=""
worker_pid=""
stopping=0

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

# SIGTERM, then SIGKILL after STOP_TIMEOUT_S; reaps the process.
# shellcheck disable=SC2317  # reached through traps
stop_process() {
    local pid="$1" what="$2" waited=0
    alive "${pid}" || return 0
    log "stopping ${what} (pid ${pid})"
    kill -TERM "${pid}" 2>/dev/null || true
    while alive "${pid}" && ((waited < STOP_TIMEOUT_S * 10)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if alive "${pid}"; then
        log "${what} did not stop in ${STOP_TIMEOUT_S}s, killing it"
        kill -KILL "${pid}" 2>/dev/null || true
    fi
    wait "${pid}" 2>/dev/null || true
}

# shellcheck disable=SC2317  # reached through traps
cleanup() {
    trap - EXIT INT TERM HUP
    stop_process "${worker_pid}" worker
    stop_process "${sidecar_pid}" "lmcache server"
    if [[ -n "${key_tmpdir}" ]]; then
        rm -rf -- "${key_tmpdir}"
    fi
}

# shellcheck disable=SC2317  # reached through traps
on_signal() {
    log "received $1, shutting down"
    stopping=1
    # The worker goes first; cleanup (on exit) stops the sidecar after it.
    if alive "${worker_pid}"; then
        kill -TERM "${worker_pid}" 2>/dev/null || true
    fi
}

trap cleanup EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

status_url="http://${LMCACHE_HTTP_HOST}:${LMCACHE_HTTP_PORT}/status"
if [[ "${LMCACHE_HTTP_HOST}" == "0.0.0.0" ]]; then
    status_url="http://127.0.0.1:${LMCACHE_HTTP_PORT}/status"
fi

probe() {
    if command -v curl >/dev/null 2>&1; then
        curl -fs -o /dev/null --max-time 2 "${status_url}"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "${status_url}" \
            >/dev/null 2>&1
    fi
}

log "starting: ${sidecar_cmd[*]}"
"${sidecar_cmd[@]}" &
sidecar_pid=$!

deadline=$((SECONDS + SIDECAR_WAIT_S))
until probe; do
    if ((stopping)); then
        exit 143
    fi
    if ! alive "${sidecar_pid}"; then
        rc=0
        wait "${sidecar_pid}" || rc=$?
        sidecar_pid=""
        log "lmcache server exited with status ${rc} before it was ready"
        exit $((rc == 0 ? 1 : rc))
    fi
    if ((SECONDS >= deadline)); then
        log "lmcache server not ready at ${status_url} after ${SIDECAR_WAIT_S}s"
        exit 1
    fi
    sleep 0.5
done
log "lmcache server ready (${status_url})"

if ((stopping)); then
    exit 143
fi
log "starting worker: ${worker_cmd[*]}"
"${worker_cmd[@]}" &
worker_pid=$!

# Wait for either process to end (polling, so trapped signals are handled promptly and
# any bash >= 4 works). After a signal the worker gets STOP_TIMEOUT_S to exit.
stop_deadline=""
while alive "${worker_pid}" && alive "${sidecar_pid}"; do
    if ((stopping)); then
        if [[ -z "${stop_deadline}" ]]; then
            stop_deadline=$((SECONDS + STOP_TIMEOUT_S))
        elif ((SECONDS >= stop_deadline)); then
            log "worker did not stop in ${STOP_TIMEOUT_S}s, killing it"
            kill -KILL "${worker_pid}" 2>/dev/null || true
        fi
    fi
    sleep 0.2
done

if ! alive "${worker_pid}"; then
    rc=0
    wait "${worker_pid}" 2>/dev/null || rc=$?
    worker_pid=""
    log "worker exited with status ${rc}"
else
    rc=0
    wait "${sidecar_pid}" 2>/dev/null || rc=$?
    sidecar_pid=""
    log "lmcache server exited with status ${rc}; stopping the worker"
    rc=$((rc == 0 ? 1 : rc))
fi
exit "${rc}"
