# The guide says `bash benchmarks/gpu_check.sh`; the check itself is benchmarks/perf/gpu_check.sh.
exec bash "$(dirname "$0")/perf/gpu_check.sh" "$@"
