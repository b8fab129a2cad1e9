"""Load on the server against offline evaluation: throughput and latency of `experiments.serve` under C concurrent
clients, beside `experiments.evaluate` on the same split at batch size C.

  python -m experiments.bench_serve [--ckpt CKPT] [--requests 64] [--concurrency 1,4,16] [--out bench_serve.json]
  python -m experiments.bench_serve --untrained     # no trained default yet: its tiny model before training

For each C the server is started (`python -m experiments.serve --max-batch C`, warmed up) on 127.0.0.1, and C
client threads send N streamed chat requests over loopback (the split's rows: image and question as evaluation
prompts them, greedy, the same latent steps, K and max tokens), bounded by --requests and --time-limit. Reported:
requests/s and answer tokens/s, p50/p99 over requests of the time to first token and of the per-token latency
(time per output token after the first: (last - first token arrival) / (tokens - 1), client side), the programs
the server compiled; then `experiments.evaluate` on the same rows at --batch-size C (its steady-state
samples/s, compilation excluded) and the server's throughput as a fraction of it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_default(work: str) -> tuple[str, str]:
    """(ckpt, data folder): the embedded default's tiny model before training (same architecture and tokenizer
    builder) and its synthetic set, built once under `work`."""
    from experiments.tiny_setup import make_tiny_checkpoint
    from ivtlr_jax.data import load_split
    from ivtlr_jax.data.synthetic import write_synthetic

    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "data", "test-00000-of-00001.parquet")):
        write_synthetic(data, n=200, n_eval=200, seed=0, level="warmup")
    ckpt = os.path.join(work, "init")
    if not os.path.exists(os.path.join(ckpt, "ivtlr_config.json")):
        rows = load_split("synthetic", "train", source=data)
        corpus = [f"{r['question']} {' '.join(r['choices'])} {r['rationale']}" for r in rows]
        make_tiny_checkpoint(work, corpus=corpus)
    return ckpt, data


def requests_of(data: str, count: int, model: str, n_latent: int, k: int, max_tokens: int) -> list[dict]:
    """The split's first rows as chat requests (image as a data: URL, the question as evaluation prompts it)."""
    from ivtlr_jax.data import load_split
    from ivtlr_jax.data.text import format_question

    ds = load_split("synthetic", "test", source=data)
    out = []
    for i in range(min(count, len(ds))):
        row = ds[i]
        image = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        out.append({"model": model, "max_tokens": max_tokens, "temperature": 0, "n_latent": n_latent, "k": k,
                    "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": format_question(
                                                                  row["question"], row["choices"])}]}]})
    return out


def start_server(ckpt: str, port: int, batch: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.serve", "--ckpt", ckpt, "--port", str(port), "--max-batch", str(batch),
           "--max-len", str(args.max_len), "--n-latent", str(args.n_latent), "--k", str(args.k),
           "--prefill-batch", str(args.prefill_batch), "--decode-steps", str(args.decode_steps),
           "--served-model-name", "bench", "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    t0 = time.time()
    while time.time() - t0 < args.start_timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {args.start_timeout} s")


def one_request(client, url: str, body: dict) -> dict:
    """Stream one request; (ttft, per-token gaps, tokens) measured at the client."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    with client.stream("POST", url, json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids") or []
                if ids:
                    times += [time.perf_counter()] * len(ids)
                    tokens += len(ids)
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None  # time per output token
    return {"ttft": times[0] - t0 if times else None, "tpot": tpot, "tokens": tokens}


def load(url: str, bodies: list[dict], concurrency: int, time_limit: float) -> dict:
    """C client threads sending the bodies in order until done or time_limit; the figures."""
    import httpx

    results, lock, nxt = [], threading.Lock(), [0]
    deadline = time.perf_counter() + time_limit

    def worker():
        with httpx.Client() as client:
            while time.perf_counter() < deadline:
                with lock:
                    if nxt[0] >= len(bodies):
                        return
                    body = bodies[nxt[0]]
                    nxt[0] += 1
                res = one_request(client, url, body)
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [r["tpot"] for r in results if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in results)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "per_token_p50_s": pct(gaps, 50), "per_token_p99_s": pct(gaps, 99)}


def offline(ckpt: str, data: str, rows: int, batch: int, args, out: str) -> dict:
    """experiments.evaluate on the same rows at --batch-size C (in a child process, as a user runs it)."""
    cmd = [sys.executable, "-m", "experiments.evaluate", "--ckpt", ckpt, "--data", "synthetic", "--data-source", data,
           "--split", "test", "--limit", str(rows), "--batch-size", str(batch), "--n-latent", str(args.n_latent),
           "--k", str(args.k), "--max-new-tokens", str(args.max_tokens), "--max-cache-len", str(args.max_len),
           "--out", out, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"experiments.evaluate failed: {(proc.stderr or proc.stdout)[-2000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "predictions.jsonl")) as f:
        tokens = [json.loads(line)["generated_tokens"] for line in f if line.strip()]
    sps = summary["samples_per_s"]
    return {"requests": len(tokens), "requests_per_s": sps, "tokens_per_s": sps * float(np.mean(tokens)),
            "timing_excludes_compilation": summary["timing_excludes_compilation"]}


def table(rows: list[dict]) -> str:
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| C | server req/s | server tok/s | TTFT p50 / p99 (ms) | per-token p50 / p99 (ms) | offline req/s | "
             "offline tok/s | server / offline |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, o = r["server"], r["offline"]
        lines.append(f"| {r['concurrency']} | {f(s['requests_per_s'], 2)} | {f(s['tokens_per_s'], 1)} | "
                     f"{f(s['ttft_p50_s'] * 1e3, 1)} / {f(s['ttft_p99_s'] * 1e3, 1)} | "
                     f"{f(s['per_token_p50_s'] * 1e3, 2)} / {f(s['per_token_p99_s'] * 1e3, 2)} | "
                     f"{f(o['requests_per_s'], 2)} | {f(o['tokens_per_s'], 1)} | {f(r['ratio'], 2)}x |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the embedded default's final model)")
    ap.add_argument("--data-source", default=None, help="synthetic split folder (default: the embedded default's)")
    ap.add_argument("--untrained", action="store_true",
                    help="without a trained default: build the embedded default's tiny model before training and "
                         "its synthetic set under --work")
    ap.add_argument("--work", default="runs/bench_serve", help="folder for --untrained's model and the offline runs")
    ap.add_argument("--requests", type=int, default=64, help="N: requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16", help="C values: concurrent clients (= --max-batch)")
    ap.add_argument("--n-latent", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-len", type=int, default=320)
    ap.add_argument("--prefill-batch", type=int, default=4, help="the server's --prefill-batch (at most C)")
    ap.add_argument("--decode-steps", type=int, default=4, help="the server's --decode-steps")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds of load per concurrency level at most")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds for the server to start and warm up")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline experiments.evaluate runs")
    ap.add_argument("--out", default="bench_serve.json", help="JSON written here")
    args = ap.parse_args(argv)
    import httpx

    if args.ckpt is None and args.untrained:
        ckpt, data = untrained_default(args.work)
    elif args.ckpt is None:
        from experiments.serve import default_ckpt

        ckpt = default_ckpt()[0]
        data = args.data_source or os.path.join(os.path.dirname(os.path.dirname(ckpt)), "data")
        if not os.path.isfile(os.path.join(ckpt, "ivtlr_config.json")):
            raise SystemExit(f"error: the embedded default's final model {ckpt} is not there; make it with "
                             "`python -m experiments.train`, or pass --untrained (its model before training) or --ckpt")
    else:
        ckpt, data = args.ckpt, args.data_source
        if data is None:
            raise SystemExit("error: --ckpt needs --data-source (a synthetic split folder)")
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies = requests_of(data, args.requests, "bench", args.n_latent, args.k, args.max_tokens)
    rows = []
    for c in levels:
        port = free_port()
        proc = start_server(ckpt, port, c, args)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            with httpx.Client() as client:  # one request end to end before timing
                one_request(client, url, bodies[0])
            programs = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            server = load(url, bodies, c, args.time_limit)
            after = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        count = lambda text: int(float(next(line.split()[1] for line in text.splitlines()  # noqa: E731
                                            if line.startswith("ivtlr_compiled_programs "))))
        server["compiled_programs"], server["compiled_during_load"] = count(after), count(after) - count(programs)
        off = None
        if not args.no_offline:
            off = offline(ckpt, data, server["requests"], c, args, tempfile.mkdtemp(prefix=f"offline{c}-",
                                                                                 dir=args.work if os.path.isdir(
                                                                                     args.work) else None))
        rows.append({"concurrency": c, "server": server, "offline": off or {"requests_per_s": None,
                                                                             "tokens_per_s": None},
                     "ratio": server["requests_per_s"] / off["requests_per_s"] if off else None})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    import jax

    result = {"ckpt": os.path.abspath(ckpt), "requests": args.requests, "n_latent": args.n_latent, "k": args.k,
              "max_tokens": args.max_tokens, "max_len": args.max_len, "device": str(jax.devices()[0].device_kind),
              "rows": rows, "table": table(rows)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(rows))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
