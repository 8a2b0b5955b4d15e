"""Load generator for OpenAI-compatible servers (splitvl, vLLM, SGLang): `python -m bench.serve`.

Streams requests at a Poisson (or gamma, `--burstiness`) rate or all at once, under an optional
`--max-concurrency` cap, and prints the numbers `vllm bench serve` prints (flag names match
where vLLM has them). Request sets: `random` (text), `random-mm` (text + random-noise PNGs of
the sizes in `--random-mm-bucket-config`; `--image-repeat-ratio` of the requests reuse an image
already sent, which splitvl's encode cache serves by content hash) and `jsonl` (one
{"prompt" | "messages", "max_tokens"?, "image"?} object per line). `--metrics-url` scrapes
Prometheus endpoints every `--metrics-interval` seconds and reports the encode cache hit
ratio, encode latency, queue depths and KV cache usage beside the client-side numbers.
`--save-result` writes vLLM's result JSON (plus one row per request and `server_metrics`);
`--plot FILE.png` draws latency CDFs and a throughput / in-flight timeline.

Against `make serve` (language HTTP on 8000; start the encode service with `--metrics-port`
to scrape it too):

    .venv/bin/python -m bench.serve --base-url http://127.0.0.1:8000 \\
        --dataset-name random-mm --num-prompts 64 --max-concurrency 8 \\
        --random-input-len 64 --random-output-len 32 \\
        --random-mm-bucket-config 64x64:0.5,128x128:0.5 --image-repeat-ratio 0.25 \\
        --ignore-eos --num-warmups 4 --seed 28 --goodput ttft:500 tpot:50 \\
        --metrics-url http://127.0.0.1:8000/metrics \\
        --metrics-url http://127.0.0.1:9100/metrics \\
        --save-result --result-dir results --plot results/c8.png

One such run on `models/shapes-vl` (a 2-core CPU shared with other jobs, so absolute numbers
move from run to run; input tokens are the server's counts, images included):

    ============ Serving Benchmark Result ============
    Successful requests:                     64
    Failed requests:                         0
    Maximum request concurrency:             8
    Request rate configured (RPS):           inf
    Benchmark duration (s):                  11.41
    Total input tokens:                      16243
    Total generated tokens:                  2048
    Request throughput (req/s):              5.61
    Request goodput (req/s):                 4.12
    Output token throughput (tok/s):         179.51
    Peak output token throughput (tok/s):    255.60
    Peak concurrent requests:                8
    Total Token throughput (tok/s):          1603.19
    ---------------Time to First Token----------------
    Mean TTFT (ms):                          389.09
    Median TTFT (ms):                        419.51
    P90 TTFT (ms):                           552.29
    P99 TTFT (ms):                           725.21
    -----Time per Output Token (excl. 1st token)------
    Mean TPOT (ms):                          32.32
    Median TPOT (ms):                        30.88
    P90 TPOT (ms):                           39.29
    P99 TPOT (ms):                           48.00
    ---------------Inter-token Latency----------------
    Mean ITL (ms):                           34.33
    Median ITL (ms):                         24.13
    P90 ITL (ms):                            63.24
    P99 ITL (ms):                            175.27
    ----------------End-to-end Latency----------------
    Mean E2EL (ms):                          1391.11
    Median E2EL (ms):                        1397.59
    P90 E2EL (ms):                           1626.31
    P99 E2EL (ms):                           1764.65
    ==================================================
    ------------ Server Metrics (scraped) ------------
    Scrapes (errors):                        26 (0)
    Encode cache hit ratio:                  0.213 (13 hits, 48 misses)
    Encode call latency, mean (ms):          76.40
    Vision forward, mean (ms):               51.70
    Request encode time, mean (ms):          106.39
    Server TTFT, mean (ms):                  324.29
    Requests waiting:                        max 0.0, mean 0.0
    Requests running:                        max 8.0, mean 6.9
    Encode queue depth:                      max 0.0, mean 0.0
    KV cache usage ratio:                    max 0.035, mean 0.029
    Prefix cache hit ratio:                  0.006
    Preemptions:                             0

(16 repeated images out of 64, but identical images in flight at the same moment share one
vision forward, which the encode service counts as neither hit nor miss.) The same settings
at concurrency 1 and 32 gave 48 and 149 output tok/s, median TTFT 114 and 1790 ms, median
TPOT 17 and 116 ms. Failed requests are listed under the table with their error messages.
Exit status: 0 when the run happened, 1 when the server was unreachable or every request
failed, 2 for bad arguments.
"""

import sys

from bench.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
