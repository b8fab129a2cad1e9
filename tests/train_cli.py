"""What the training tests share: the small test run (synthetic data, a YAML) and the CLI in a subprocess."""

import json
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "mrope_section": [2, 3, 3],
               "vision": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2}}


XLA_CACHE = {}  # the subprocesses share a persistent compilation cache: each program compiles once per session


def make_workdir(tmp_path_factory):
    """Synthetic data (24 train rows) and a small test YAML (tiny model, full fine-tuning, k=4)."""
    from ivtlr_jax.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("train")
    base = tmp_path_factory.getbasetemp()
    # one cache for every xdist worker of the session (their basetemps share a parent)
    XLA_CACHE["dir"] = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache")
    write_synthetic(str(root / "data"), n=24, n_eval=8, seed=0)
    cfg = {"init": "auto-tiny", "data": "synthetic", "data_source": str(root / "data"), "epochs_per_stage": 1,
           "max_latent_stage": 3, "k": 4, "finetune": "full", "lr": 1e-3, "batch_size": 8, "compute_dtype": "float32",
           "max_length": 256, "mesh": "cpu", "log_every": 1, "save_every": 100, "keep": 5, "num_workers": 0,
           "model": SMALL_MODEL}
    path = root / "test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, str(path)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    return [r for r in records(run_dir) if "loss" in r]


def cli_env(devices=None):
    """CPU, `devices` simulated devices, and a low LLVM optimisation level (compiles in half the time)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    if devices:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    if "dir" in XLA_CACHE:
        env.update(JAX_COMPILATION_CACHE_DIR=XLA_CACHE["dir"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def run_cli(args, devices=None, code=None):
    """python -m experiments.train in a subprocess (simulated CPU devices set before JAX starts); `code` runs first
    (python -c: e.g. a patch that makes a write fail)."""
    head = [sys.executable, "-c", code + "\nfrom experiments.train import main\nmain()"] if code else \
        [sys.executable, "-m", "experiments.train"]
    proc = subprocess.run([*head, *args], cwd=ROOT, env=cli_env(devices), capture_output=True, text=True,
                          timeout=600)
    return proc


def error_lines(stderr):
    """stderr without progress bars and blank lines."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
            and "s/it]" not in line and not line.startswith(("converting", "stage "))]


def trainable_of(run_dir, step):
    from stored import read_checkpoint

    state, meta = read_checkpoint(os.path.join(run_dir, "checkpoints", str(step)))
    return state["trainable"], meta


def train_config(workdir, name, **kw):
    from experiments.train import prepare_auto_tiny
    from ivtlr_jax.train.config import TrainConfig

    root, cfg = workdir
    values = yaml.safe_load(open(cfg))
    model = values.pop("model")
    values.update(out=str(root / name), **kw)
    tcfg = TrainConfig(**values)
    prepare_auto_tiny(tcfg, model)
    return tcfg

