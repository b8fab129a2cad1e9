"""The largest micro-batch of a training config that the compiler fits in a share of the chip's HBM.

A 7B train step takes 3 to 15 minutes to compile on 2 cores, so the micro-batch is not searched blindly: the
step (the trainer's own, through the dry run) is compiled at two micro-batches (`--points`), the memory it needs
per chip (the larger of XLA's total and its peak; for a program XLA:TPU refuses for HBM, the temporaries its
message names plus the frozen weights and train state, a lower bound) is fitted as a line in the rows per chip
(temporaries grow about linearly with the rows), the largest micro-batch the line puts under `--budget` x HBM
is chosen, and that choice is compiled to confirm it (stepping down while it does not fit). The optimiser update
keeps the config's `batch_size` rows; `grad_accum` becomes batch_size / micro-batch. Writes JSON and prints a table.

  python -m experiments.fit_micro_batch --config qwen2vl_7b_m3cot --mesh tpu_v4_8 --points 8,32
  python -m experiments.fit_micro_batch --config chameleon_7b_scienceqa --mesh tpu_v5e_8 --points 8,16
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file: make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import dataclasses
import json
import os
import time

GIB = 2**30


def _gib(nbytes) -> str:
    return f"{nbytes / GIB:.2f}"


def candidates(batch_size: int, data_parallel: int) -> list[int]:
    """Micro-batches a config can take: divisors of batch_size that split evenly over the data-parallel devices."""
    return [m for m in range(data_parallel, batch_size + 1, data_parallel) if batch_size % m == 0]


def fit_line(points: dict[int, int], chips: int) -> tuple[float, float]:
    """(bytes at 0 rows, bytes per row per chip) through the two widest-apart compiled micro-batches."""
    (m0, n0), (m1, n1) = sorted(points.items())[0], sorted(points.items())[-1]
    slope = (n1 - n0) / ((m1 - m0) / chips)
    return n0 - slope * m0 / chips, slope


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.fit_micro_batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML or a name under experiments/configs")
    ap.add_argument("--mesh", help="mesh preset (default: the config's)")
    ap.add_argument("--budget", type=float, default=0.85, help="share of the chip's HBM the step may use "
                    "(default 0.85)")
    ap.add_argument("--points", help="two micro-batches (rows per micro-step over all chips) to compile for the "
                    "line, e.g. 8,32 (default: the config's micro-batch and twice it)")
    ap.add_argument("--compiler", default="tpu", choices=["tpu", "cpu"], help="XLA:TPU on the preset's topology "
                    "(needs `pip install -e '.[tpu]'`) or XLA:CPU on simulated devices")
    ap.add_argument("--finetune", choices=["lora", "full"], help="default: the config's")
    ap.add_argument("--out", help="JSON file (default: runs/fit_micro_batch/<config>_<mesh>.json)")
    args = ap.parse_args(argv)

    import yaml

    from experiments.run_config import yaml_model_config
    from experiments.tiny_setup import config_path

    with open(config_path(args.config)) as f:
        values = yaml.safe_load(f) or {}
    mesh_name = args.mesh or values.get("mesh") or "auto"
    from ivtlr_jax import sharding as sh

    if args.compiler == "cpu":
        sh.simulate_cpu_devices(mesh_name)  # before JAX starts its backend
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.dry_run import dry_run

    fields = {k: v for k, v in values.items() if k != "model"}
    fields.update(mesh=mesh_name, **({"finetune": args.finetune} if args.finetune else {}))
    tcfg = TrainConfig.from_dict(fields)
    cfg = yaml_model_config(args.config)
    if cfg.latent_token_id is None:
        cfg = dataclasses.replace(cfg, latent_token_id=cfg.vocab_size - 1)
    if getattr(cfg, "image_vocab", None) == ():  # Chameleon without its vocabulary map: any ids size the gathers
        cfg = dataclasses.replace(cfg, image_vocab=tuple(range(4, 4 + cfg.vq.num_embeddings)))
    bb = backbone_for(cfg)
    target = sh.compile_target(mesh_name, args.compiler)
    chips = target.mesh.devices.size
    data_parallel = 1
    for axis in sh.BATCH_AXES:
        data_parallel *= target.mesh.shape.get(axis, 1)
    allowed = candidates(tcfg.batch_size, data_parallel)
    current = tcfg.batch_size // tcfg.grad_accum
    points = [int(p) for p in args.points.split(",")] if args.points else [current, min(2 * current, allowed[-1])]
    bad = [p for p in points if p not in allowed]
    if len(set(points)) != 2 or bad:
        raise SystemExit(f"--points {args.points!r}: give two different micro-batches out of {allowed} (divisors "
                         f"of batch_size={tcfg.batch_size} that split over {data_parallel} data-parallel devices)")
    hbm = target.hbm_bytes
    if hbm is None:
        raise SystemExit(f"--mesh {mesh_name}: the preset names no HBM size per chip; use a TPU preset")
    budget = args.budget * hbm
    runs: dict[int, dict] = {}

    def compile_at(micro: int) -> dict:
        t0 = time.time()
        r = dry_run(bb, dataclasses.replace(tcfg, grad_accum=tcfg.batch_size // micro), target)
        r["wall_s"] = time.time() - t0
        runs[micro] = r
        print(f"micro-batch {micro} ({micro / chips:g} rows per chip): needs {_gib(r['bytes_needed_per_chip'])} GiB "
              f"per chip (args {_gib(r['compiler_argument_size_in_bytes'])}, temp "
              f"{_gib(r['compiler_temp_size_in_bytes'])}) in {r['compile_s']:.0f} s"
              + (f" (at least: {r['compiler_refused']})" if "compiler_refused" in r else ""), flush=True)
        return r

    for p in points:
        compile_at(p)
    base, per_row = fit_line({m: r["bytes_needed_per_chip"] for m, r in runs.items()}, chips)
    predicted = {m: base + per_row * m / chips for m in allowed}
    fitting = [m for m in allowed if predicted[m] <= budget]
    choice = fitting[-1] if fitting else None
    while choice is not None:
        r = runs.get(choice) or compile_at(choice)
        if r["bytes_needed_per_chip"] <= budget:
            break
        smaller = [m for m in allowed if m < choice]
        choice = smaller[-1] if smaller else None
    chosen = runs.get(choice) if choice is not None else None
    result = {
        "config": args.config, "mesh": mesh_name, "compiler": target.compiler,
        "compiler_version": target.compiler_version, "topology": target.topology, "finetune": tcfg.finetune,
        "batch_size": tcfg.batch_size, "hbm_bytes_per_chip": hbm, "budget": args.budget,
        "line": {"bytes_at_zero_rows": base, "bytes_per_row_per_chip": per_row},
        "predicted_bytes_per_chip": predicted, "micro_batch": choice,
        "grad_accum": tcfg.batch_size // choice if choice else None,
        "attention": chosen["attention"] if chosen else None,
        "compiled": {str(m): {k: r[k] for k in ("bytes_needed_per_chip", "compiler_argument_size_in_bytes",
                                                  "compiler_temp_size_in_bytes", "compiler_total_bytes_per_device",
                                                  "compile_s", "custom_calls", "attention", "remat",
                                                  "compiler_refused")
                              if k in r} | {"peak_bytes": r.get("compiler_peak_memory_in_bytes")}
                     for m, r in sorted(runs.items())},
    }
    print(f"\n{'micro-batch':>12}{'rows/chip':>10}{'predicted GiB':>15}{'compiled GiB':>14}  (args / temp / peak)")
    for m in allowed:
        r = runs.get(m)
        got = (f"{_gib(r['bytes_needed_per_chip']):>14}  ({_gib(r['compiler_argument_size_in_bytes'])} / "
               f"{_gib(r['compiler_temp_size_in_bytes'])} / {_gib(r.get('compiler_peak_memory_in_bytes') or 0)})"
               if r else f"{'':>14}")
        print(f"{m:>12}{m / chips:>10g}{predicted[m] / GIB:>15.2f}{got}")
    verdict = (f"micro-batch {choice} (grad_accum {tcfg.batch_size // choice}): "
               f"{chosen['bytes_needed_per_chip'] / GIB:.2f} of {hbm / GIB:.0f} GiB per chip, under the "
               f"{args.budget:.0%} budget of {budget / GIB:.2f} GiB") if chosen else \
        f"no micro-batch fits {args.budget:.0%} of {hbm / GIB:.0f} GiB per chip"
    print(f"{args.config} on {mesh_name} ({target.compiler.upper()}, {target.compiler_version}): {verdict}")
    out = args.out or os.path.join("runs", "fit_micro_batch", f"{os.path.basename(args.config).removesuffix('.yaml')}"
                                                             f"_{mesh_name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()
