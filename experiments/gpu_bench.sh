#!/usr/bin/env bash
# The accelerator checks of the speed issue as one script for a lent GPU; at most ~8 minutes in all
# (a global deadline: a run that would pass it gets less time or is skipped, and the summary says so).
#   1. cuDNN attention check: the decoder with attention=cudnn (bf16) against the float32 dense truth, with
#      left/right padding, the attention row and gradients, as close as dense bf16 is (the CPU test suite
#      cannot run this kernel).
#   2. Train-step table: 2B full fine-tuning, 2B LoRA, 7B LoRA (random weights, bf16, batch 8 x ~419
#      tokens, attention and remat on auto): tokens/s, MFU, peak device memory.
#   3. Decode table: batch-1 decode after the latent steps, 2B and 7B shapes: tokens/s and % of the
#      memory-bandwidth bound from the weight + cache bytes actually read.
#   4. If time is left: A/B runs of the levers on the 2B LoRA step (attention xla, remat full).
# Everything is written under $OUT (default ./out): one JSON per run, gpu_bench.json, gpu_bench.md.
# Usage: OUT=out bash experiments/gpu_bench.sh     (from the repository root)
set -uo pipefail
OUT=${OUT:-out}
BUDGET=${BUDGET:-470}  # seconds for everything, summary included
mkdir -p "$OUT"
export PYTHONPATH=.
export TF_CPP_MIN_LOG_LEVEL=2
PY=${PYTHON:-python3}
START=$SECONDS
LOG="$OUT/gpu_bench.log"
: > "$LOG"
rm -f "$OUT/skipped.txt"

left() { echo $((BUDGET - (SECONDS - START))); }
# run NAME CAP_SECONDS CMD...: run with timeout min(CAP, time left - 15 s); skip when under 30 s are left.
run() {
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 15 )); (( t > cap )) && t=$cap
  if (( t < 30 )); then echo "SKIP $name (time budget spent)" | tee -a "$LOG"; echo "$name skipped" >> "$OUT/skipped.txt"; return; fi
  echo "== $name (timeout ${t}s, $(( SECONDS - START ))s elapsed)" | tee -a "$LOG"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^WARNING\|absl\|^I0000\|^E0000\|Writing model" "$OUT/$name.log" | tail -4 | tee -a "$LOG"
  (( rc == 124 )) && echo "$name timed out" >> "$OUT/skipped.txt"
  (( rc != 0 && rc != 124 )) && echo "$name failed (rc $rc)" >> "$OUT/skipped.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"; } \
  2>&1 | tee "$OUT/gpu.txt" | tee -a "$LOG"

run attention_check 90 $PY - "$OUT/attention_check.json" <<'EOF'
# Each implementation in bf16 against the float32 dense truth; cudnn/xla must be about as close as dense bf16.
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import spec as sp

d = ly.DecoderDims(vocab_size=256, hidden_size=1536, intermediate_size=1024, num_layers=2, num_heads=12,
                   num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, rope_sections=(0,) * 64)
p32 = sp.init_params_numpy(ly.decoder_spec(d), 0)
p32 = jax.tree.map(lambda x: jnp.asarray(x * (3.0 if x.ndim == 3 else 1.0), jnp.float32), p32)
b, s = 4, 256
valid = np.ones((b, s), bool)
valid[0, :37] = False; valid[1, 200:] = False; valid[2, :5] = False; valid[2, 250:] = False  # left, right, both
e32 = jnp.asarray(np.random.default_rng(0).normal(size=(b, s, d.hidden_size)), jnp.float32)
pos = jnp.asarray(np.clip(np.cumsum(valid, 1) - 1, 0, None)[:, None], jnp.int32)
kv = jnp.asarray(valid)
fn = jax.jit(ly.decoder, static_argnums=(1, 5), static_argnames=("attn_row", "attention"))

def forward(params, emb, attention):
    return fn(params, d, emb, pos, ly.init_cache(d, b, s, emb.dtype), 0, kv, attn_row=True, attention=attention)

def loss(params, emb, attention):
    h = forward(params, emb, attention)[0].astype(jnp.float32)
    return jnp.sum(jnp.where(kv[..., None], jnp.sin(3 * h), 0.0)) / kv.sum()

grad = jax.jit(jax.grad(loss), static_argnums=2)
true_h, _, true_row = forward(p32, e32, "dense")
true_g = grad(p32, e32, "dense")
p16, e16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32), e32.astype(jnp.bfloat16)
last_real = np.asarray(valid[:, -1])
rel = lambda a, t: float(jnp.abs(a.astype(jnp.float32) - t).max() / (jnp.abs(t).max() + 1e-9))
out = {"device": jax.devices()[0].device_kind}
for impl in ("dense", "cudnn", "xla"):
    try:
        h, _, row = forward(p16, e16, impl)
        g = grad(p16, e16, impl)
    except Exception as e:  # noqa: BLE001 - report and go on
        out[impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
        continue
    out[impl] = {"hidden_rel_err": rel(h[kv], true_h[kv]),
                 "row_abs_err": float(jnp.abs(row - true_row)[last_real].max()),
                 "grad_rel_err": max(rel(a, t) for a, t in zip(jax.tree.leaves(g), jax.tree.leaves(true_g))),
                 "finite": bool(jnp.isfinite(h.astype(jnp.float32)).all())
                 and all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in jax.tree.leaves(g))}
ref = out["dense"]
for impl in ("cudnn", "xla"):
    r = out[impl]
    r["ok"] = "error" not in ref and "error" not in r and r["finite"] and all(
        r[k] <= 1.5 * ref[k] + 0.01 for k in ("hidden_rel_err", "row_abs_err", "grad_rel_err"))
ok = out["ok"] = out["cudnn"]["ok"] and out["xla"]["ok"]
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
print("ATTENTION CHECK", "PASSED" if ok else "FAILED", "(cudnn, xla in bf16 vs the float32 dense truth)")
EOF

TRAIN="-m experiments.bench_train --dtype bfloat16 --batch 8 --steps 5 --mesh gpu_1"
run train_2b_full 110 $PY $TRAIN --model 2b --finetune full --out "$OUT/train_2b_full.json"
run train_2b_lora 100 $PY $TRAIN --model 2b --finetune lora --out "$OUT/train_2b_lora.json"
run train_7b_lora 150 $PY $TRAIN --model 7b --finetune lora --out "$OUT/train_7b_lora.json"
DECODE="-m experiments.bench_decode --batch 1 --new-tokens 128 --repeats 3 --mesh gpu_1"
run decode_2b 80 $PY $DECODE --model 2b --out "$OUT/decode_2b.json"
run decode_7b 100 $PY $DECODE --model 7b --out "$OUT/decode_7b.json"
# Levers, A/B on the 2B LoRA step, only with time to spare
run train_2b_lora_attention_xla 100 $PY $TRAIN --model 2b --finetune lora --attention xla \
  --out "$OUT/train_2b_lora_attention_xla.json"
run train_2b_lora_remat_full 100 $PY $TRAIN --model 2b --finetune lora --remat full \
  --out "$OUT/train_2b_lora_remat_full.json"

$PY - "$OUT" <<'EOF' | tee "$OUT/gpu_bench.md"
import glob, json, os, sys
out = sys.argv[1]
load = lambda p: json.load(open(p)) if os.path.exists(p) else None
gpu = open(os.path.join(out, "gpu.txt")).read().strip()
train = [(n, load(os.path.join(out, n + ".json"))) for n in
         ("train_2b_full", "train_2b_lora", "train_7b_lora", "train_2b_lora_attention_xla", "train_2b_lora_remat_full")]
decode = [(n, load(os.path.join(out, n + ".json"))) for n in ("decode_2b", "decode_7b")]
check = load(os.path.join(out, "attention_check.json"))
print(f"device: {gpu}\n")
print("| train step | attention | remat | batch x len | step s | tokens/s | MFU | peak device GiB |")
print("|---|---|---|---|---|---|---|---|")
for name, r in train:
    if r is None:
        print(f"| {name} | not run | | | | | | |"); continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    peak = f"{r['peak_device_bytes'] / 2**30:.1f}" if r.get("peak_device_bytes") else "n/a"
    print(f"| {r['model']} {r['finetune']} | {r['attention']} | {r['remat']} | {r['batch']}x{r['seq_len']} | "
          f"{r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | {mfu} | {peak} |")
print()
print("| decode (batch 1) | attention | prompt | new tokens | ms/step | tokens/s | GB read/step | bound tokens/s | % of bound |")
print("|---|---|---|---|---|---|---|---|---|")
for name, r in decode:
    if r is None:
        print(f"| {name} | not run | | | | | | | |"); continue
    bound = f"{r['bound_tokens_per_s']:.0f}" if r.get("bound_tokens_per_s") else "n/a"
    frac = f"{100 * r['fraction_of_bound']:.1f}%" if r.get("fraction_of_bound") else "n/a"
    print(f"| {r['model']} | {r['attention']} | {r['final_prompt_tokens']} | {r['new_tokens']} | {r['ms_per_step']:.2f} | "
          f"{r['tokens_per_s']:.1f} | {r['bytes_per_step'] / 1e9:.2f} | {bound} | {frac} |")
print()
print("cuDNN attention check:", "not run" if check is None else ("passed" if check.get("ok") else "FAILED")
      + " " + json.dumps({k: v for k, v in check.items() if k != "ok"}))
skipped = os.path.join(out, "skipped.txt")
if os.path.exists(skipped):
    print("not completed:", "; ".join(open(skipped).read().split("\n")).strip("; "))
json.dump({"device": gpu, "train": dict(train), "decode": dict(decode), "attention_check": check},
          open(os.path.join(out, "gpu_bench.json"), "w"), indent=2)
EOF
echo "total $(( SECONDS - START )) s; results in $OUT/gpu_bench.json and $OUT/gpu_bench.md" | tee -a "$LOG"
