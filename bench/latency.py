"""Latency: how soon an idle jobrunner sends a job to the downstream.

    python bench/latency.py [--samples 20] [--idle 5] [--types 30] [--concurrency 10]

`jobrunner run` (its defaults) on a private PostgreSQL, `--types` job types of
`--concurrency` each (300 slots by default), bench/fast_downstream.py, which
reports the CLOCK_MONOTONIC time at which each POST arrives. After a warm-up
(one job per type), `--samples` times: stay idle `--idle` seconds, PUT one job
(to the next type in turn) and time the POST's arrival at the downstream from
the PUT's answer (the job is enqueued: the dispatch latency) and from the PUT's
start (the enqueue too); wait for its callback. Prints p50, p99 and max of
both; one result line is appended to bench/results.txt.
"""

import argparse
import statistics
import time

from harness import idle_service, percentile, private_database, put_job, record, wait_callbacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before each job")
    parser.add_argument("--types", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()

    latencies, with_enqueue = [], []
    with private_database() as database, idle_service(database, args.types, args.concurrency) as (service, downstream, arrivals, names):
        called_back = len(names)
        for sample in range(args.samples):
            time.sleep(args.idle)
            job_id, started, answered = put_job(service.port, names[sample % len(names)])
            arrived = arrivals.wait_for(job_id)
            latencies.append((arrived - answered) * 1000)
            with_enqueue.append((arrived - started) * 1000)
            called_back += 1
            wait_callbacks(downstream, called_back)
            print(f"sample {sample + 1}: {latencies[-1]:.2f} ms after the PUT's answer, {with_enqueue[-1]:.2f} ms after its start",
                  flush=True)

    def figures(values: list[float]) -> str:
        return f"p50 {statistics.median(values):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, max {max(values):.1f} ms"

    record(f"latency after {args.idle:g} s idle, {args.types}x{args.concurrency} slots, {len(latencies)} jobs: dispatch "
           f"{figures(latencies)}; with the enqueue {figures(with_enqueue)}")


if __name__ == "__main__":
    main()
