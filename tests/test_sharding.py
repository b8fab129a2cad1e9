"""Mesh presets, rules and global batches on 8 simulated CPU devices (run in a subprocess before JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NUM_DEVICES = 8


# ------------------------------------------------------------------------------- checks (child process)
def _tiny_cfg(tie=False):
    from tiny import tiny_hf_config

    from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig

    return Qwen2VLConfig.from_hf_dict(tiny_hf_config(tie=tie).to_dict())


def _custom_mesh(data, fsdp, tensor):
    from ivtlr_jax import sharding

    preset = sharding.MeshPreset("test", data * fsdp * tensor, 1, None, data=data, fsdp=fsdp, tensor=tensor)
    return sharding.make_mesh(preset)


def check_presets_build():
    import jax

    from ivtlr_jax import sharding

    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    mesh = sharding.make_mesh("tpu_v4_8", devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}, mesh.shape
    mesh = sharding.make_mesh("gpu_8")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}, mesh.shape
    assert mesh.devices.size == 8
    assert dict(sharding.make_mesh("tpu_v5e_8").shape)["fsdp"] == 8
    assert dict(sharding.make_mesh("auto").shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.make_mesh("cpu").devices.size == 1
    line = sharding.describe(mesh)
    assert "fsdp=8" in line and "8 cpu devices on 1 host" in line, line
    assert set(sharding.PRESETS) >= {"cpu", "gpu_1", "gpu_8", "tpu_v4_8", "tpu_v4_32", "tpu_v5e_8", "auto"}
    assert sharding.PRESETS["tpu_v4_32"].num_devices == 16 and sharding.PRESETS["tpu_v4_32"].num_hosts == 4
    # single-host presets never initialise jax.distributed; calling twice is fine
    assert not sharding.maybe_initialize_distributed("tpu_v4_8")
    assert not sharding.maybe_initialize_distributed("tpu_v4_8")
    assert not sharding.maybe_initialize_distributed("auto")


def check_wrong_preset_error():
    import jax

    from ivtlr_jax import sharding

    def message(*args, **kwargs):
        try:
            sharding.make_mesh(*args, **kwargs)
        except ValueError as e:
            return str(e)
        raise AssertionError(f"make_mesh{args} did not raise")

    msg = message("tpu_v4_8")
    assert "'tpu_v4_8'" in msg and "needs 4 devices on 1 host" in msg and "found 8 cpu devices on 1 host" in msg, msg
    assert "--mesh=auto" in msg and "gpu_8" in msg, msg
    msg = message("tpu_v4_32")
    assert "'tpu_v4_32'" in msg and "16 devices on 4 hosts" in msg and "found 8 cpu devices" in msg, msg
    msg = message("gpu_8", devices=jax.devices()[:4])
    assert "'gpu_8'" in msg and "needs 8 devices" in msg and "found 4 cpu devices" in msg and "tpu_v4_8" in msg, msg
    msg = message("gpu_1")
    assert "'gpu_1'" in msg and "found 8 cpu devices" in msg, msg
    msg = message("tpu_v9")
    assert "tpu_v9" in msg and "tpu_v4_8" in msg, msg


def _spec(cfg):
    from ivtlr_jax.models import backbone_for

    return backbone_for(cfg).param_spec()


def check_param_shardings():
    import jax

    from ivtlr_jax import sharding
    from ivtlr_jax.models import spec as sp
    from ivtlr_jax.models.adapters import adapter_spec

    meshes = {
        "tpu_v4_8": sharding.make_mesh("tpu_v4_8", devices=jax.devices()[:4]),
        "gpu_8": sharding.make_mesh("gpu_8"),
        "2x2x2": _custom_mesh(2, 2, 2),
        "tensor8": _custom_mesh(1, 1, 8),
    }
    for tie in (False, True):
        cfg = _tiny_cfg(tie)
        spec = _spec(cfg)
        for name, mesh in meshes.items():
            shardings = sharding.param_shardings(mesh, spec)
            zeros = sp.map_spec(lambda i: np.zeros(i.shape, np.float32), spec)
            placed = jax.device_put(zeros, shardings)
            flat_sh, _ = jax.tree_util.tree_flatten_with_path(shardings)
            flat_arr = jax.tree.leaves(placed)
            sharded = 0
            for (path, sh), arr in zip(flat_sh, flat_arr, strict=True):
                assert arr.sharding == sh, (name, path)
                for dim, axes in enumerate(sh.spec):
                    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
                    size = int(np.prod([mesh.shape[a] for a in axes]))
                    assert arr.shape[dim] % size == 0, (name, path, arr.shape, sh.spec)
                    sharded += bool(axes)
                if ".layers" in jax.tree_util.keystr(path) or ".blocks" in jax.tree_util.keystr(path):
                    assert len(sh.spec) == 0 or sh.spec[0] is None, (name, path, sh.spec)  # layer axis never split
            assert sharded > 0, name
        # FSDP splits embed; tensor parallel splits heads/mlp/vocab; vocab 300 does not divide by 8
        sh = sharding.param_shardings(meshes["gpu_8"], spec)
        assert tuple(sh.llm.layers.gate.kernel.spec) == (None, "fsdp"), sh.llm.layers.gate
        sh = sharding.param_shardings(meshes["2x2x2"], spec)
        assert tuple(sh.llm.layers.up.kernel.spec) == (None, "fsdp", "tensor")
        assert tuple(sh.llm.embed.spec) == ("tensor", "fsdp")
        sh = sharding.param_shardings(meshes["tensor8"], spec)
        assert tuple(sh.llm.embed.spec) == (), sh.llm.embed
        assert tuple(sh.llm.layers.gate.kernel.spec) == (None, None, "tensor")

    # LoRA adapters: stacked A/B per target kernel, axes derived from the base kernel's input/output
    aspec = adapter_spec(_spec(_tiny_cfg()), 4)
    assert aspec.llm.layers.q.a.axes == ("layers", ("embed", "embed"), "lora_rank")
    assert aspec.llm.layers.q.b.axes == ("layers", "lora_rank", ("heads", "embed"))
    assert aspec.llm.layers.down.b.axes == ("layers", "lora_rank", ("embed", "embed"))
    assert aspec.vision is None or not jax.tree_util.tree_leaves(aspec.vision, is_leaf=sp.is_info)  # LLM only
    assert aspec.llm.embed is None and aspec.llm.layers.input_norm is None
    mesh = meshes["2x2x2"]
    lora_sh = sharding.param_shardings(mesh, aspec)
    placed = jax.device_put(sp.map_spec(lambda i: np.zeros(i.shape, np.float32), aspec), lora_sh)
    assert tuple(lora_sh.llm.layers.q.a.spec) == (None, "fsdp")
    assert tuple(lora_sh.llm.layers.q.b.spec) == (None, None, ("tensor", "fsdp"))  # heads, then FSDP
    assert placed.llm.layers.q.b.sharding == lora_sh.llm.layers.q.b


def check_host_batch_to_global():
    import jax

    from ivtlr_jax import sharding

    rng = np.random.default_rng(0)
    local = {  # every leaf batch-leading, as a LatentBatch's
        "input_ids": rng.integers(0, 300, (8, 10)).astype(np.int32),
        "attention_mask": np.ones((8, 10), np.int32),
        "pixel_values": rng.normal(size=(8, 1, 16, 1176)).astype(np.float32),
    }
    for mesh in (sharding.make_mesh("gpu_8"), sharding.make_mesh("tpu_v4_8", devices=jax.devices()[:4]),
                 _custom_mesh(2, 2, 2)):
        batch = sharding.host_batch_to_global(mesh, local)
        n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
        for key, value in local.items():
            assert batch[key].shape == value.shape, (key, batch[key].shape)  # one process: global = local
            np.testing.assert_array_equal(np.asarray(batch[key]), value)
            assert {s.data.shape[0] for s in batch[key].addressable_shards} == {8 // n_batch}, key
        ids = batch["input_ids"]
        assert ids.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 2), 2)
        assert {s.data.shape for s in ids.addressable_shards} == {(8 // n_batch, 10)}
    # a batch of 2 does not divide over 8 devices: replicated instead
    mesh = sharding.make_mesh("gpu_8")
    small = sharding.host_batch_to_global(mesh, {"input_ids": local["input_ids"][:2]})
    assert small["input_ids"].shape == (2, 10) and small["input_ids"].sharding.is_fully_replicated
    try:
        sharding.host_batch_to_global(mesh, {"input_ids": local["input_ids"],
                                             "pixel_values": local["pixel_values"][:3]})
    except ValueError as e:
        assert "leading (batch) size" in str(e), e
    else:
        raise AssertionError("mismatched leading sizes did not raise")


def check_sharded_matmul_equals_unsharded():
    import jax

    from ivtlr_jax import sharding
    from ivtlr_jax.models import spec as sp

    cfg = _tiny_cfg()
    spec = _spec(cfg)
    rng = np.random.default_rng(0)
    params = sp.map_spec(lambda i: rng.normal(0, 0.2, i.shape).astype(np.float32), spec)
    x = rng.normal(size=(8, 5, cfg.hidden_size)).astype(np.float32)  # (batch, length, embed)

    def mlp_logits(p, x):
        layer = jax.tree.map(lambda a: a[0], p.llm.layers)
        y = x + layer.o(layer.q(x))
        y = y + layer.down(jax.nn.silu(layer.gate(y)) * layer.up(y))
        return (y * p.llm.norm) @ p.llm.lm_head

    expected = np.asarray(jax.jit(mlp_logits)(params, x))
    for mesh in (sharding.make_mesh("gpu_8"), sharding.make_mesh("tpu_v4_8", devices=jax.devices()[:4]),
                 _custom_mesh(2, 2, 2)):
        p_sh = sharding.param_shardings(mesh, spec)
        x_sh = sharding.batch_sharding(mesh, 3)
        fn = jax.jit(mlp_logits, in_shardings=(p_sh, x_sh), out_shardings=sharding.batch_sharding(mesh, 3))
        got = fn(jax.device_put(params, p_sh), jax.device_put(x, x_sh))
        assert got.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 3), 3)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)  # summation order differs
        assert len(got.sharding.device_set) == mesh.devices.size


CHECKS = [check_presets_build, check_wrong_preset_error, check_param_shardings, check_host_batch_to_global,
          check_sharded_matmul_equals_unsharded]


def _child_main():
    sys.path[:0] = [ROOT, HERE]
    results = {}
    for check in CHECKS:
        start = time.perf_counter()
        try:
            check()
            results[check.__name__] = "ok"
        except Exception:
            results[check.__name__] = traceback.format_exc()
        print(f"{check.__name__}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print("RESULTS " + json.dumps(results))


# ------------------------------------------------------------------------------- tests (parent process)
@pytest.fixture(scope="module")
def child_results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_on_simulated_devices(child_results, check):
    result = child_results[check]
    assert result == "ok", result


@pytest.mark.parametrize("tie", [False, True])
def test_spec_axes_are_known_rules(tie):
    from ivtlr_jax import sharding
    from ivtlr_jax.models import spec as sp

    sys.path.insert(0, HERE)
    for name, info in sp.infos(_spec(_tiny_cfg(tie))):
        assert len(info.shape) == len(info.axes), name
        assert all(a in sharding.LOGICAL_RULES for a in info.axes), (name, info.axes)
    with pytest.raises(ValueError, match="'nope' is not in LOGICAL_RULES"):
        sharding.logical_to_spec(("embed", ("heads", "nope")), sharding.make_mesh("cpu"))


def test_import_sets_the_cpu_xla_flags_only_for_several_cpu_devices():
    """`import ivtlr_jax` adds CPU_XLA_FLAGS to XLA_FLAGS when the process asks for several CPU devices (a user's own
    value of a flag wins), and leaves a single-device run on XLA's default scheduler; this jaxlib accepts the flags
    (an unknown flag aborts at the first device query)."""
    from ivtlr_jax import CPU_XLA_FLAGS

    probe = "import os, ivtlr_jax, jax; jax.devices(); print(os.environ.get('XLA_FLAGS', ''))"
    name = CPU_XLA_FLAGS[0].split("=")[0]
    two = "--xla_force_host_platform_device_count=2"
    cases = ((two, CPU_XLA_FLAGS[0]), (f"{two} {name}=true", f"{name}=true"), (None, None),
             ("--xla_force_host_platform_device_count=1", None))
    for given, want in cases:
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **({"XLA_FLAGS": given} if given else {}))
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        flags = proc.stdout.split()
        if want is None:
            assert not any(f.startswith(name) for f in flags), (given, flags)
        else:
            assert want in flags and sum(f.startswith(name) for f in flags) == 1, (given, flags)


def test_simulated_dry_run_devices_and_joined_cpu_processes_get_the_flags(monkeypatch):
    """The dry run's simulated devices and a CPU process joining others set CPU_XLA_FLAGS too (before JAX starts)."""
    import ivtlr_jax
    from ivtlr_jax import sharding

    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    sharding.simulate_cpu_devices("tpu_v4_8")
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=4" in flags and ivtlr_jax.CPU_XLA_FLAGS[0] in flags
    monkeypatch.setenv("XLA_FLAGS", "")
    sharding.simulate_cpu_devices("cpu")
    assert ivtlr_jax.CPU_XLA_FLAGS[0] not in os.environ["XLA_FLAGS"].split()


def test_a_cpu_run_does_not_load_libtpu_and_keep_its_lock():
    """libtpu installed on a host without TPU: JAX, imported before or after ivtlr_jax, starts on CPU without loading
    libtpu (which would keep its lock file while the process runs, stopping dry runs elsewhere from compiling for
    TPU), and compile-only TPU devices still come (they load it)."""
    import ivtlr_jax
    from ivtlr_jax import sharding

    if not sharding.libtpu_installed() or ivtlr_jax.tpu_attached():
        pytest.skip("needs libtpu installed on a host without TPU chips")
    probe = (
        "import jax, ivtlr_jax\n"
        "print(jax.devices()[0].platform, 'libtpu' in open('/proc/self/maps').read())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}
    env.update(PYTHONPATH=ROOT)
    for code in (probe, probe.replace("import jax, ivtlr_jax", "import ivtlr_jax, jax")):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["cpu", "False"], (code, proc.stdout, proc.stderr[-2000:])
    # a user's explicit JAX_PLATFORMS is kept
    proc = subprocess.run([sys.executable, "-c", "import ivtlr_jax, os; print(os.environ['JAX_PLATFORMS'])"],
                          env={**env, "JAX_PLATFORMS": "cpu,tpu"}, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["cpu,tpu"], proc.stderr[-2000:]


if __name__ == "__main__":
    _child_main()
