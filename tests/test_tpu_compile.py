"""XLA:TPU compiles, on this CPU machine, for TPU topologies (libtpu's compile-only devices): the tiny config's
train step (LoRA and full), latent forward and generation on v4:2x2x1 and v5e:2x4, the attention "auto" picks
on 4 chips and on one, and a small program on every TPU preset's topology.

libtpu is held by one process at a time, until it exits: every TPU compile of the suite is in this file (pytest-
xdist keeps a file on one worker) and runs in this process, the CLIs included (their `main(argv)`). A test skips
only where libtpu has no wheel for the platform.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import threading
import time

import pytest
import yaml

LIBTPU_HAS_WHEEL = sys.platform == "linux" and platform.machine() == "x86_64"
MOSAIC_CALL = "tpu_custom_call"  # the custom-call target of a Pallas TPU (Mosaic) kernel in compiled HLO
TINY = "tiny"  # experiments/configs/tiny.yaml: the embedded default's model (auto-tiny), float32 in the YAML
LIBTPU_WAIT_S = 600


@pytest.fixture(scope="module")
def sh():
    """ivtlr_jax.sharding, once this process holds libtpu (a failure, not a skip, where libtpu has a wheel); while
    another process holds it (a compile elsewhere on this machine), waited for up to LIBTPU_WAIT_S."""
    from ivtlr_jax import sharding

    if not sharding.libtpu_installed():
        if LIBTPU_HAS_WHEEL:
            pytest.fail(f"libtpu is not installed: {sharding.TPU_EXTRA}")
        pytest.skip(f"libtpu has no wheel for {sys.platform} {platform.machine()}: no XLA:TPU here")
    deadline = time.time() + LIBTPU_WAIT_S
    while True:
        try:
            sharding.PRESETS["tpu_v4_8"].topology.devices()  # libtpu is this process's from now until it exits
            return sharding
        except ValueError as e:
            if "another process holds libtpu" not in str(e) or time.time() > deadline:
                raise
            time.sleep(5)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """RUN_DIR/init of the tiny config holding only its model's config (the auto-tiny model, its tokenizer trained
    once here): a dry run with --out RUN_DIR sizes that model without building it again."""
    from experiments.train import dry_run_model_config
    from ivtlr_jax.train.config import TrainConfig

    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = dry_run_model_config(TrainConfig(init="auto-tiny", data="synthetic", out=str(run_dir)), {})
    (run_dir / "init" / "params").mkdir(parents=True)
    cfg.save(str(run_dir / "init" / "ivtlr_config.json"))
    return run_dir / "init"


def _run_dir_with(init, path):
    """`path` as a RUN_DIR holding a copy of the tiny init."""
    shutil.copytree(init, path / "init")
    return path


@pytest.fixture(scope="module")
def tiny_backbone(tiny_init):
    """The tiny config's backbone (no weights), with a latent token id."""
    import dataclasses

    from ivtlr_jax.convert.checkpoint import load_config
    from ivtlr_jax.models import backbone_for

    cfg = load_config(str(tiny_init))
    return backbone_for(dataclasses.replace(cfg, latent_token_id=cfg.latent_token_id or cfg.vocab_size - 1))


@pytest.fixture(scope="module")
def compiled_latent_forward(sh, tiny_backbone):
    """preset -> the tiny model's latent forward compiled by XLA:TPU on the preset's mesh ("one_chip": the first
    chip of v4:2x2x1), attention "auto", bfloat16; compiled once each."""
    import jax

    from ivtlr_jax.latent import LatentConfig, latent_forward_jit
    from ivtlr_jax.model import abstract_params
    from ivtlr_jax.train.dry_run import example_batch

    done = {}

    def compile_for(preset: str):
        if preset not in done:
            mesh = sh.compile_target("tpu_v4_8", "tpu").mesh
            if preset == "one_chip":
                mesh = sh.make_mesh(sh.MeshPreset("one_chip", 1, 1, "tpu"), mesh.devices.flat[:1])
            elif preset != "tpu_v4_8":
                mesh = sh.compile_target(preset, "tpu").mesh
            bb, lcfg = tiny_backbone, LatentConfig(k=4)
            one = example_batch(bb, lcfg, 1, tail=32, n=2)
            batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((8,) + x.shape[1:], x.dtype), one)
            batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                                 sh.batch_shardings(mesh, batch))
            params = abstract_params(bb, mesh, "bfloat16")
            done[preset] = latent_forward_jit.lower(bb, params, lcfg, batch, mesh=mesh).compile()
        return done[preset]

    return compile_for


def _restore_after_cli(monkeypatch):
    """The train CLI installs process-wide error hooks and a console log handler: put back after the test."""
    for name in ("excepthook", "unraisablehook"):
        monkeypatch.setattr(sys, name, getattr(sys, name))
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))


def _assert_compiled_with_xla_tpu(result: dict, preset: str, sh):
    topology = sh.PRESETS[preset].topology
    assert result["compiler"] == "xla:tpu" and result["compiler_version"].startswith("libtpu "), result
    assert result["topology"] == topology.name and topology.chip.device_kind in result["mesh"], result
    assert result["compiler_argument_size_in_bytes"] > 0 and result["compiler_temp_size_in_bytes"] > 0  # memory
    assert result["compiler_peak_memory_in_bytes"] > 0
    assert result["hbm_bytes_per_chip"] == topology.chip.hbm_bytes and result["fits"] is True
    need = max(result["compiler_total_bytes_per_device"], result["compiler_peak_memory_in_bytes"])
    assert result["bytes_needed_per_chip"] == need
    assert result["headroom_bytes_per_chip"] == topology.chip.hbm_bytes - need
    assert result["attention"] == "pallas" and MOSAIC_CALL in result["custom_calls"], result["custom_calls"]


def test_every_tpu_preset_compiles_on_its_topology(sh):
    """Each TPU preset's topology gives its chips on its hosts (the whole pod, from this one process), of its
    chip's kind, and XLA:TPU compiles an FSDP matmul over its mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    presets = [p for p in sh.PRESETS.values() if p.topology is not None]
    assert {p.name for p in presets} >= {"tpu_v4_8", "tpu_v4_32", "tpu_v4_64", "tpu_v5e_8", "tpu_v5p_8", "tpu_v6e_8"}
    assert any(p.topology.chip.name in ("v5e", "v6e") and p.num_hosts > 1 for p in presets)
    for p in presets:
        target = sh.compile_target(p, "tpu")
        devices = list(target.mesh.devices.flat)
        assert len(devices) == p.num_devices and len({d.process_index for d in devices}) == p.num_hosts, p.name
        assert {d.device_kind for d in devices} == {p.topology.chip.device_kind}, p.name
        assert dict(target.mesh.shape) == p.axis_sizes(p.num_devices), p.name
        x = jax.ShapeDtypeStruct((64 * p.num_devices, 256), jnp.bfloat16,
                                 sharding=NamedSharding(target.mesh, PartitionSpec("fsdp")))
        compiled = jax.jit(lambda a: a @ a.T).lower(x).compile()
        assert compiled.memory_analysis().argument_size_in_bytes == x.size * 2 // p.num_devices, p.name


@pytest.mark.parametrize("preset", ["tpu_v4_8", "tpu_v5e_8"])
def test_train_dry_run_compiles_the_tiny_step_with_xla_tpu(sh, tiny_init, preset, tmp_path, monkeypatch, capsys):
    """`experiments.train --dry-run` on a TPU preset compiles the tiny config's LoRA and full steps with XLA:TPU for
    its topology, the Pallas kernel in them; its table ends with the verdict and its JSON names the compiler."""
    from experiments import train

    _restore_after_cli(monkeypatch)
    train.main(["--config", TINY, "--dry-run", "--mesh", preset, "--compute-dtype", "auto",
                "--out", str(_run_dir_with(tiny_init, tmp_path))])
    results = json.loads((tmp_path / "dry_run.json").read_text())
    assert [r["finetune"] for r in results] == ["lora", "full"]
    for r in results:
        _assert_compiled_with_xla_tpu(r, preset, sh)
        assert r["compute_dtype"] == "bfloat16" and r["model_flops_per_update_per_chip"] > 0
        assert r["seconds_per_update_at_peak"] == pytest.approx(r["model_flops_per_update_per_chip"]
                                                                / sh.PRESETS[preset].topology.chip.peak_flops)
    lines = capsys.readouterr().out.splitlines()
    hbm = sh.PRESETS[preset].topology.chip.hbm_bytes // 2**30
    assert lines[-2].startswith("lora fits: ") and f" of {hbm} GiB per chip" in lines[-2], lines[-2]


def test_a_step_over_the_chips_hbm_is_reported_as_not_fitting(sh, tiny_backbone, monkeypatch):
    """XLA:TPU refuses at compile time a program whose temporaries exceed the chip's HBM (a 7B step at too many rows
    per chip): the dry run reads the compiler's own message into a "does not fit" result, a lower bound, instead of
    a traceback (fit_micro_batch goes on from it). The message is a real one, from a program of 48 GiB of
    temporaries compiled for one v5e chip (16 GiB)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from ivtlr_jax.train import dry_run as dr
    from ivtlr_jax.train.config import TrainConfig

    target = sh.compile_target("tpu_v5e_8", "tpu")
    x = jax.ShapeDtypeStruct((1 << 14,), jnp.float32, sharding=SingleDeviceSharding(target.mesh.devices.flat[0]))
    grid = lambda a: jnp.sin(a[:, None] * a[None, :])  # noqa: E731 - 1 GiB
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as refused:
        jax.jit(lambda a: jnp.sort(jnp.concatenate([grid(a) * i for i in range(24)]), axis=0)[0]).lower(x).compile()

    def compile_refused(lower, what):
        raise refused.value

    monkeypatch.setattr(dr, "compile_with_progress", compile_refused)
    r = dr.dry_run(tiny_backbone, TrainConfig(finetune="lora", mesh="tpu_v5e_8", batch_size=8, k=4), target)
    assert r["compiler_temp_size_in_bytes"] == 48 * 2**30 and r["fits"] is False and r["custom_calls"] == []
    assert r["bytes_needed_per_chip"] == r["compiler_temp_size_in_bytes"] + r["frozen_params_bytes_per_device"] \
        + r["state_bytes_per_device"] and r["frozen_params_bytes_per_device"] > 0  # LoRA: the weights are frozen
    assert r["compiler_refused"] == ("XLA:TPU refused to compile it: its temporaries alone need 48.00 GiB per chip, "
                                     "over the 15.75 GiB it can use")
    verdict = dr.fit_verdict([r], lambda r: "lora ")
    assert verdict.startswith("lora does not fit: at least 48.0") and "; XLA:TPU refused to compile it" in verdict
    assert dr.refused_figures(ValueError("RESOURCE_EXHAUSTED: out of host memory"), 0) is None  # others re-raise


def test_cost_model_slice_of_the_tiny_step(sh, tiny_backbone):
    """XLA:TPU's cost model on the loop-free 2-layer slice: an estimate labelled as such, or the reason there is
    none; either way the slice's figures are recorded."""
    import jax.numpy as jnp

    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.dry_run import COST_MODEL_LABEL, StepProgram, cost_model_figures

    target = sh.compile_target("tpu_v4_8", "tpu")
    tcfg = TrainConfig(finetune="full", mesh="tpu_v4_8", batch_size=8, k=4)  # full: XLA:TPU compiles LoRA slower
    program = StepProgram(tiny_backbone, tcfg, target, jnp.bfloat16, 124, 8, 1)
    _, (_, _, batch) = program.inputs()
    cost = cost_model_figures(program, "dots", batch)
    assert cost["slice_layers"] == 2 and cost["slice_analytic_flops_per_chip"] > 0 and cost["slice_flops_per_chip"] > 0
    if "estimate_seconds_per_update" in cost:
        assert cost["estimate_seconds_per_update"] > 0 and cost["label"].startswith(COST_MODEL_LABEL)
    else:
        assert cost["reason"], cost


@pytest.mark.parametrize("preset", ["tpu_v4_8", "tpu_v5e_8"])
def test_evaluate_dry_run_compiles_generation_with_xla_tpu_from_the_config(sh, tiny_init, preset, tmp_path):
    """`experiments.evaluate --dry-run --config` (the tiny YAML, its out: a RUN_DIR with the tiny init) compiles
    generation for the topology without a checkpoint."""
    from experiments import evaluate
    from experiments.tiny_setup import config_path

    tiny = yaml.safe_load(open(config_path(TINY)))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**tiny, "out": str(_run_dir_with(tiny_init, tmp_path / "run"))}))
    out = tmp_path / "dry.json"
    result = evaluate.main(["--config", str(config), "--dry-run", "--mesh", preset, "--batch-size", "8",
                            "--max-new-tokens", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    _assert_compiled_with_xla_tpu(result, preset, sh)
    assert result["dtype"] == "bfloat16" and result["kv_cache_bytes_per_device"] > 0


@pytest.mark.parametrize("preset", ["tpu_v4_8", "tpu_v5e_8", "one_chip"])
def test_latent_forward_compiles_with_the_pallas_kernel(compiled_latent_forward, preset):
    """The latent forward's attention "auto" is the Pallas kernel on a TPU mesh of 4 or 8 chips and on one chip."""
    compiled = compiled_latent_forward(preset)
    assert compiled.memory_analysis().argument_size_in_bytes > 0
    assert MOSAIC_CALL in compiled.as_text()


def test_compiler_choice_errors_name_the_fix(monkeypatch):
    """--compiler tpu without libtpu, or for a preset with no TPU topology, and libtpu held by another process:
    one line each, naming the flag and the fix."""
    from ivtlr_jax import sharding

    with pytest.raises(ValueError, match=r"--compiler tpu: --mesh gpu_8 is not a TPU slice; use one of tpu_v4_8"):
        sharding.resolve_compiler("tpu", "gpu_8")
    assert sharding.resolve_compiler("auto", "gpu_8") == sharding.resolve_compiler("cpu", "tpu_v4_8") == "cpu"
    monkeypatch.setattr(sharding, "libtpu_installed", lambda: False)
    with pytest.raises(ValueError, match=r"needs libtpu, which is not installed: pip install -e '\.\[tpu\]'"):
        sharding.resolve_compiler("tpu", "tpu_v4_8")
    assert sharding.resolve_compiler("auto", "tpu_v4_8") == "cpu"

    from jax.experimental import topologies

    def held(**_):
        raise RuntimeError('ABORTED: Internal error when accessing libtpu multi-process lockfile. Run "$ sudo rm '
                           '/tmp/libtpu_lockfile".')

    monkeypatch.setattr(topologies, "get_topology_desc", held)
    with pytest.raises(ValueError) as err:
        sharding.PRESETS["tpu_v4_8"].topology.devices()
    assert str(err.value) == ("another process holds libtpu (/tmp/libtpu_lockfile): only one process at a time can "
                              "compile for TPU; wait until it ends, or use --compiler cpu (a JAX process on a machine "
                              "without TPU, started with JAX_PLATFORMS unset and without importing ivtlr_jax, holds it "
                              "too)")


def test_mesh_list_prints_every_preset_with_its_chip(capsys):
    """`--mesh list` (train and evaluate): every preset; a TPU slice with its topology, HBM and peak per chip."""
    from experiments import evaluate, train
    from ivtlr_jax import sharding

    train.main(["--mesh", "list"])
    listed = capsys.readouterr().out
    evaluate.main(["--mesh", "list"])
    assert capsys.readouterr().out == listed
    rows = {line.split()[0]: line for line in listed.splitlines()[1:]}
    assert set(sharding.PRESETS) <= set(rows)
    row = rows["tpu_v5p_8"].split()
    assert row[1:7] == ["4", "1", "fsdp=4", "v5p:2x2x1", "95", "GiB"] and "459 TFLOP/s" in rows["tpu_v5p_8"]
    assert all(("TFLOP/s" in rows[p.name]) == (p.topology is not None) for p in sharding.PRESETS.values())
