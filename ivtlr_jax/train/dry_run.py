"""Ahead-of-time compile of the train step on abstract arrays: per-chip memory and time before renting a pod.

The state layout is the one `create_train_state` materialises (`state_layout`), so the state figures here
are the ones a real start reports; the batch is laid out by the same `make_latent_batch` as training. The
step is compiled for a `sharding.CompileTarget`: XLA:TPU on the compile-only devices of a TPU preset's
topology (libtpu installed), else XLA:CPU on simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm

from ivtlr_jax import sharding as sh
from ivtlr_jax.latent import LatentBatch, make_latent_batch
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.base import Backbone
from ivtlr_jax.models.layers import resolve_attention
from ivtlr_jax.sharding import GIB
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.remat import resolve_remat
from ivtlr_jax.train.state import state_layout
from ivtlr_jax.train.step import build_train_step, compute_dtype, make_optimizer, micro_batch_size, model_flops

DRY_RUN_TEXT = 124  # prompt text tokens around the image (the reference prompt: ~124 + 100 image tokens)
DRY_RUN_TAIL = 256  # labelled tokens after the latent steps
COST_SLICE_LAYERS = 2  # decoder layers of the loop-free slice whose time XLA:TPU's cost model estimates
COST_MODEL_TOLERANCE = 0.10  # the slice's compiler FLOPs must match the analytic count this closely
COST_MODEL_LABEL = "XLA:TPU cost-model estimate, not a measurement"


def example_batch(bb: Backbone, lcfg, rows: int, text: int = DRY_RUN_TEXT, tail: int = DRY_RUN_TAIL,
                  n: int = 3) -> LatentBatch:
    """A numpy LatentBatch of `rows` rows of [text, one reference image, text] + n latents + tail."""
    cfg = bb.config
    pixel_values, grid, n_img = bb.example_image()
    row = [1] * (text // 2) + [cfg.image_token_id] * n_img + [1] * (text - text // 2)
    row += [cfg.latent_token_id] * n + [1] * tail
    ids = np.tile(np.asarray(row, np.int32), (rows, 1))
    labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - tail, ids, -100)
    pv = np.concatenate([pixel_values] * rows)
    grids = None if grid is None else np.concatenate([grid] * rows)
    return make_latent_batch(bb, lcfg, ids, np.ones_like(ids), labels, pv, grids)


def compile_with_progress(lower: Callable, what: str):
    """`lower().compile()` with the elapsed time shown on stderr meanwhile (a ticker on a terminal, else a line
    before and after); returns (compiled, seconds). It runs in a worker thread, so that Ctrl-C stops a compile
    of many minutes at once (the main thread waits in Python, where the interrupt is raised)."""
    start = time.time()
    ticker = tqdm(desc=f"compiling {what}", bar_format="{desc}: {elapsed}", file=sys.stderr, disable=None,
                  leave=False)
    if ticker.disable:
        print(f"compiling {what} ...", file=sys.stderr, flush=True)
    outcome = {}

    def work():
        try:
            outcome["compiled"] = lower().compile()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name="compile", daemon=True)  # abandoned, not awaited, on Ctrl-C
    worker.start()
    try:
        while worker.is_alive():
            worker.join(1.0)
            ticker.refresh()
    finally:
        ticker.close()
    if "error" in outcome:
        raise outcome["error"]
    seconds = time.time() - start
    print(f"compiled {what} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return outcome["compiled"], seconds


def memory_figures(compiled) -> dict:
    """XLA's memory analysis of a compiled program, per device, as `compiler_*` keys ({} where it gives none)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    out = {"compiler_" + name: int(getattr(mem, name, 0) or 0)
           for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                        "alias_size_in_bytes", "generated_code_size_in_bytes")}
    out["compiler_total_bytes_per_device"] = (out["compiler_argument_size_in_bytes"]
                                              + out["compiler_output_size_in_bytes"]
                                              - out["compiler_alias_size_in_bytes"]
                                              + out["compiler_temp_size_in_bytes"])
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    if peak:  # the compiler's peak of live buffers (XLA:TPU's heap simulation)
        out["compiler_peak_memory_in_bytes"] = peak
    return out


def custom_calls(compiled) -> list[str]:
    """The custom-call targets in a compiled program (a Pallas TPU kernel is a Mosaic "tpu_custom_call")."""
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))


# XLA:TPU refuses, at compile time, a program whose temporaries exceed the chip's HBM, and says by how much
_OUT_OF_HBM = re.compile(r"RESOURCE_EXHAUSTED.*?memory.*?temporaries \(([0-9.]+)([KMGT])i?B?\).*?available HBM "
                         r"\(([0-9.]+)([KMGT])i?B?\)", re.S)


def refused_figures(error: BaseException, argument_bytes: int) -> dict | None:
    """Memory figures of a program XLA:TPU refused for HBM, from its message (None for any other error).

    The temporaries are the compiler's own figure (XLA's sizes are binary: G = GiB); `argument_bytes` are the
    arguments the caller knows of per device (a train step: the frozen weights and the train state; the batch's
    few MB are left out), so the need is a lower bound."""
    found = _OUT_OF_HBM.search(str(error))
    if found is None:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    temp = int(float(found.group(1)) * scale[found.group(2)])
    usable = int(float(found.group(3)) * scale[found.group(4)])
    return {"compiler_argument_size_in_bytes": argument_bytes, "compiler_output_size_in_bytes": 0,
            "compiler_temp_size_in_bytes": temp, "compiler_alias_size_in_bytes": 0,
            "compiler_total_bytes_per_device": argument_bytes + temp,
            "compiler_refused": f"XLA:TPU refused to compile it: its temporaries alone need {temp / GIB:.2f} GiB per "
                                f"chip, over the {usable / GIB:.2f} GiB it can use"}


def fit_figures(target: sh.CompileTarget, mem: dict) -> dict:
    """What the program needs per chip (the larger of the compiler's total and its peak), the target's HBM per chip
    and whether it fits (None where the HBM is unknown)."""
    hbm = target.hbm_bytes
    need = max(mem.get("compiler_total_bytes_per_device", 0), mem.get("compiler_peak_memory_in_bytes", 0)) or None
    known = hbm is not None and need is not None
    return {"bytes_needed_per_chip": need, "hbm_bytes_per_chip": hbm, "fits": (need <= hbm) if known else None,
            "headroom_bytes_per_chip": (hbm - need) if known else None}


def target_figures(target: sh.CompileTarget) -> dict:
    """The compiler, its version, the topology and the mesh a dry run compiled for."""
    return {"mesh_preset": target.preset.name, "mesh": target.describe(), "compiler": target.compiler,
            "compiler_version": target.compiler_version, "topology": target.topology}


def abstract_step_inputs(bb: Backbone, tcfg: TrainConfig, mesh, layout, text: int = DRY_RUN_TEXT,
                         tail: int = DRY_RUN_TAIL, n: int = 3, processes: int = 1):
    """(state, frozen, micro-batch) as ShapeDtypeStructs with the shardings the trainer's step gets: the batch
    has the trainer's micro-batch rows (`micro_batch_size`), laid out by `make_latent_batch`."""
    data_parallel = int(np.prod([mesh.shape[a] for a in sh.BATCH_AXES if a in mesh.shape]))
    micro = micro_batch_size(tcfg, processes, data_parallel)
    one = example_batch(bb, tcfg.latent(bb.default_k), 1, text, tail, n)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((micro,) + x.shape[1:], x.dtype), one)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                         sh.batch_shardings(mesh, batch))
    return layout.state, layout.frozen, batch


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The trainer's micro-step for one backbone and config on a target, ready to lower on abstract inputs."""

    bb: Backbone
    tcfg: TrainConfig
    target: sh.CompileTarget
    dtype: object
    text: int
    tail: int
    n: int

    def inputs(self):
        tx, _ = make_optimizer(self.tcfg, 1000)
        layout = state_layout(self.bb, self.tcfg, self.target.mesh, tx, self.dtype)
        return layout, abstract_step_inputs(self.bb, self.tcfg, self.target.mesh, layout, self.text, self.tail,
                                            self.n, processes=self.target.preset.num_hosts or 1)

    def lower(self, remat: str, unroll: bool = False):
        """The step under the `remat` policy, lowered (traced) on the abstract inputs; `unroll`: every loop unrolled."""
        tcfg = dataclasses.replace(self.tcfg, remat=remat)
        tx, schedule = make_optimizer(tcfg, 1000)
        layout, (state, frozen, batch) = self.inputs()
        step = build_train_step(self.bb, tcfg.latent(self.bb.default_k), tcfg, tx, schedule, self.dtype, layout,
                                self.target.mesh, unroll=unroll)
        return step.lower(state, frozen, batch)


def time_figures(program: StepProgram, batch: LatentBatch, peak_flops: float | None) -> dict:
    """Model FLOPs of one optimiser update per chip and its time at the chip's peak (a lower bound)."""
    chips = program.target.mesh.devices.size
    flops = model_flops(program.bb, program.tcfg, batch) * program.tcfg.grad_accum / chips
    return {"model_flops_per_update_per_chip": flops, "peak_flops_per_chip": peak_flops,
            "seconds_per_update_at_peak": flops / peak_flops if peak_flops else None}


def cost_model_figures(program: StepProgram, remat: str, batch: LatentBatch) -> dict:
    """XLA:TPU's cost model on a loop-free slice of the step (COST_SLICE_LAYERS decoder layers at the model's
    widths, every scan unrolled: the cost analysis counts a loop's body once), scaled to the whole model by
    the analytic FLOPs. `estimate_seconds_per_update` is set only when the slice's optimal_seconds is positive
    and its FLOPs are within COST_MODEL_TOLERANCE of the analytic count; `reason` says why not otherwise."""
    if program.target.compiler != "xla:tpu":
        return {"reason": f"the cost model is XLA:TPU's; this dry run compiled with {program.target.compiler}"}
    layers = program.bb.dims.num_layers
    if layers <= COST_SLICE_LAYERS:
        return {"reason": f"the model has {layers} decoder layers: no slice is smaller"}
    piece = dataclasses.replace(program, bb=program.bb.replace_config(num_hidden_layers=COST_SLICE_LAYERS))
    lowered = piece.lower(remat, unroll=True)
    compiled, seconds = compile_with_progress(lambda: lowered, f"the {COST_SLICE_LAYERS}-layer slice (cost model)")
    cost = compiled.cost_analysis() or {}
    chips = program.target.mesh.devices.size
    slice_flops = model_flops(piece.bb, piece.tcfg, batch) / chips  # one micro-step, per chip
    full_flops = model_flops(program.bb, program.tcfg, batch) / chips
    flops, optimal = float(cost.get("flops", 0.0)), cost.get("optimal_seconds")
    out = {"slice_layers": COST_SLICE_LAYERS, "slice_compile_s": seconds, "slice_flops_per_chip": flops,
           "slice_analytic_flops_per_chip": slice_flops, "slice_optimal_seconds": optimal}
    mismatch = flops / slice_flops - 1.0
    problems = []
    if optimal is None:
        problems.append("the cost analysis gives no optimal_seconds")
    elif optimal <= 0:
        problems.append(f"the slice's optimal_seconds is {optimal:.3g}, not a time")
    if abs(mismatch) > COST_MODEL_TOLERANCE:
        problems.append(f"its compiler FLOPs ({flops:.3g} per chip) are {mismatch:+.0%} off the analytic count "
                        f"({slice_flops:.3g}, which leaves out what the backward pass recomputes, remat {remat}'s "
                        "layers and the loss's checkpointed LM head, and counts attention as causal)")
    if problems:
        out["reason"] = "; ".join(problems)
    else:
        out["estimate_seconds_per_update"] = optimal * full_flops / slice_flops * program.tcfg.grad_accum
        out["label"] = (f"{COST_MODEL_LABEL}: the {COST_SLICE_LAYERS}-layer slice scaled to "
                        f"{program.bb.dims.num_layers} layers by the analytic FLOPs")
    return out


def dry_run(bb: Backbone, tcfg: TrainConfig, target: sh.CompileTarget | None = None, text: int = DRY_RUN_TEXT,
            tail: int = DRY_RUN_TAIL, n: int = 3, compare_remat: bool = False, cost_model: bool = False) -> dict:
    """Lower and compile the train step for `target` (default: XLA:CPU for tcfg.mesh) without loading weights.

    The step is built by `build_train_step`, the trainer's own builder, and fed the trainer's micro-batch
    (batch_size / grad_accum rows). Returns per-device bytes of frozen params, trainable params, optimiser
    state, the train state's total (`state_bytes_total`), the compiler's memory analysis and whether it fits
    the chip's HBM, the model FLOPs of one update per chip and its time at peak, and (`cost_model`, XLA:TPU)
    the cost model's estimate from a loop-free slice. Compute dtype and attention are resolved for the target's
    devices. With `compare_remat` and a policy other than "full" the step is compiled once more with "full" and
    `remat_cost_bytes_per_device` is the extra temporary memory the policy's saved activations take.
    """
    target = target or sh.compile_target(tcfg.mesh, "cpu")
    dtype = compute_dtype(tcfg, target.preset.platform or target.platform)
    remat = resolve_remat(tcfg.remat, bb.dims)
    program = StepProgram(bb, tcfg, target, dtype, text, tail, n)
    layout, (_, _, batch) = program.inputs()
    report = layout.report()
    start = time.time()
    try:
        compiled, seconds = compile_with_progress(lambda: program.lower(remat), f"the {tcfg.finetune} train step "
                                                  f"for {target.preset.name} with {target.compiler.upper()}")
        mem = memory_figures(compiled)
    except Exception as e:  # only XLA:TPU's out-of-HBM refusal is a result; the rest re-raised
        mem = refused_figures(e, report["frozen_bytes_per_device"] + report["state_bytes_per_device"])
        if mem is None:
            raise
        compiled, seconds = None, time.time() - start
        print(mem["compiler_refused"], file=sys.stderr, flush=True)
    peak = tcfg.peak_tflops * 1e12 if tcfg.peak_tflops else target.peak_flops
    out = {
        "model_type": bb.model_type,
        "parameters": int(sum(np.prod(info.shape) for _, info in sp.infos(bb.param_spec()))),
        **target_figures(target), "finetune": tcfg.finetune, "compute_dtype": str(dtype), "remat": remat,
        "attention": resolve_attention(tcfg.attention, dtype, bb.dims.head_dim, platform=target.platform),
        "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum, "micro_batch": batch.batch_size,
        "micro_batch_per_device": batch.batch_size / target.mesh.devices.size,
        "seq_len": int(batch.kv_valid.shape[1]), "compile_s": seconds,
        "frozen_params_bytes_per_device": report["frozen_bytes_per_device"],
        "trainable_params_bytes_per_device": report["trainable_bytes_per_device"],
        "optimizer_state_bytes_per_device": report["optimizer_bytes_per_device"],
        "state_bytes_total": report["state_bytes_total"],
        "state_bytes_per_device": report["state_bytes_per_device"],
        **mem, **fit_figures(target, mem), **time_figures(program, batch, peak),
        "custom_calls": custom_calls(compiled) if compiled is not None else [],
    }
    if compiled is None:  # refused for HBM: nothing more to compile or ask
        return out
    if mem and compare_remat and remat != "full":
        full, _ = compile_with_progress(lambda: program.lower("full"), f"the {tcfg.finetune} train step with remat "
                                        "full (--compare-remat)")
        out["compiler_temp_size_in_bytes_remat_full"] = memory_figures(full)["compiler_temp_size_in_bytes"]
        out["remat_cost_bytes_per_device"] = (mem["compiler_temp_size_in_bytes"]
                                              - out["compiler_temp_size_in_bytes_remat_full"])
    elif mem and compare_remat:
        out["remat_cost_bytes_per_device"] = 0
    if cost_model:
        out["cost_model"] = cost_model_figures(program, remat, batch)
    return out


def _gib(nbytes) -> str:
    return f"{nbytes / GIB:.2f}"


def fit_verdict(results: list[dict], label: Callable[[dict], str]) -> str:
    """The last line of a dry run's table: does each program fit the chip's HBM (`label` names a result)."""
    parts = []
    for r in results:
        need = r["bytes_needed_per_chip"]
        if need is None:
            parts.append(f"{label(r)}unknown (the compiler gave no memory analysis)")
        elif r["hbm_bytes_per_chip"] is None:
            parts.append(f"{label(r)}unknown ({_gib(need)} GiB per device; --mesh {r['mesh_preset']} names no HBM "
                         "size)")
        else:
            hbm, room = r["hbm_bytes_per_chip"], r["headroom_bytes_per_chip"]
            verdict = "fits" if r["fits"] else "does not fit"
            spare = f"{_gib(room)} GiB free" if room >= 0 else f"{_gib(-room)} GiB over"
            refused = f"; {r['compiler_refused']}" if "compiler_refused" in r else ""
            parts.append(f"{label(r)}{verdict}: {'at least ' if refused else ''}{_gib(need)} of {hbm / GIB:.0f} GiB "
                         f"per chip ({spare}{refused})")
    estimated = "" if results[0]["compiler"] == "xla:tpu" else " (XLA:CPU's estimate: compile with XLA:TPU to know)"
    return "; ".join(parts) + estimated


def _seconds(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.3g} s"


def format_dry_run(results: list[dict]) -> str:
    """The dry run's table (GiB per device), its footnote, the time figures and, last, the verdict."""
    remat_cost = any("remat_cost_bytes_per_device" in r for r in results)
    peak = any("compiler_peak_memory_in_bytes" in r for r in results)
    head = (f"{'finetune':<9}{'frozen GiB':>11}{'trainable GiB':>14}{'optimizer GiB':>14}{'compiler total GiB':>19}"
            f"{'  (args/out/temp)':<24}" + (f"{'peak GiB':>9}" if peak else "")
            + (f"{'remat cost GiB':>15}" if remat_cost else ""))
    lines = [head]
    for r in results:
        total = r.get("compiler_total_bytes_per_device")
        detail = ""
        if total is not None:
            detail = "  ({}/{}/{})".format(*(_gib(r[f"compiler_{k}_size_in_bytes"]) for k in ("argument", "output",
                                                                                                "temp")))
        row = (f"{r['finetune']:<9}{r['frozen_params_bytes_per_device'] / GIB:>11.2f}"
               f"{r['trainable_params_bytes_per_device'] / GIB:>14.3f}"
               f"{r['optimizer_state_bytes_per_device'] / GIB:>14.3f}{(total or 0) / GIB:>19.2f}{detail:<24}")
        if peak:
            row += f"{r['compiler_peak_memory_in_bytes'] / GIB:>9.2f}" if "compiler_peak_memory_in_bytes" in r \
                else f"{'n/a':>9}"
        if remat_cost:
            cost = r.get("remat_cost_bytes_per_device")
            row += f"{'n/a' if cost is None else _gib(cost):>15}"
        lines.append(row)
    first = results[0]
    topology = f", topology {first['topology']}" if first["topology"] else ""
    params = first["parameters"]
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    steps = "1 micro-step" if first["grad_accum"] == 1 else f"{first['grad_accum']} micro-steps"
    lines.append(f"{first['model_type']} ({size} parameters), per device, on {first['mesh']}; compiled by "
                 f"{first['compiler'].upper()} ({first['compiler_version']}{topology}); optimiser updates of "
                 f"{first['batch_size']} rows in {steps} of {first['micro_batch']} rows of {first['seq_len']} "
                 f"tokens, {first['compute_dtype']} compute, "
                 f"attention {first['attention']}, remat {first['remat']}"
                 + (" (remat cost: its extra temporary memory over remat full)" if remat_cost else ""))
    for r in results:
        peak_flops = r["peak_flops_per_chip"]
        line = f"{r['finetune']}: model FLOPs per update per chip {r['model_flops_per_update_per_chip']:.3g}"
        if peak_flops:
            line += (f"; {_seconds(r['seconds_per_update_at_peak'])} per update at the chip's peak of "
                     f"{peak_flops / 1e12:.0f} TFLOP/s (a lower bound)")
        else:
            line += "; no time at peak (the preset names no chip: --peak-tflops gives one)"
        cost = r.get("cost_model")
        if cost is None:
            line += "; --cost-model asks XLA:TPU's cost model for an estimate" if r["compiler"] == "xla:tpu" else ""
        elif "estimate_seconds_per_update" in cost:
            line += f"; {_seconds(cost['estimate_seconds_per_update'])} per update ({cost['label']})"
        else:
            line += f"; no cost-model estimate: {cost['reason']}"
        lines.append(line)
    lines.append(fit_verdict(results, lambda r: f"{r['finetune']} " if len(results) > 1 else ""))
    return "\n".join(lines)
