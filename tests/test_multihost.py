"""Multi-process training tried for real: 2 JAX processes x 2 CPU devices over loopback (gloo collectives), started
by experiments.launch_local, against 1 process x 4 devices; and the faults a pod run meets (SIGTERM to every
process, a process SIGKILLed during an asynchronous checkpoint write), each with what must survive.

One 2-process run goes through the faults (SIGTERM, SIGKILL, two resumes): a resume continues exactly, so
its losses and final params must still equal the uninterrupted 1-process run's. The runs share a persistent
XLA compilation cache and a low LLVM optimisation level (process 1 of a CPU run still compiles each time:
JAX writes the cache from process 0 only and keys CPU programs by the local devices).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "mrope_section": [2, 3, 3],
               "vision": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2}}
STEPS = 6  # stage 2 of 24 rows, global batch 8, 2 epochs per stage: 6 steps

pytestmark = pytest.mark.slow

# A process of the run that SIGKILLs itself right after starting the asynchronous write of its first
# periodic checkpoint (IVTLR_TEST_KILL=PROCESS_ID), i.e. while that write is in flight.
FAULT_MODULE = textwrap.dedent("""
    import os, signal
    import jax
    from ivtlr_jax.train import checkpoints

    who = int(os.environ["IVTLR_TEST_KILL"])
    real_save = checkpoints.RunCheckpoints.save

    def save(self, step, state, meta):
        real_save(self, step, state, meta)  # orbax has started writing; the commit is still to come
        if jax.process_index() == who:
            print(f"test: killing process {who} while checkpoint {step} is being written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.RunCheckpoints.save = save
    from experiments.train import main
    main()
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic data, one tiny model (built once), the YAML and the environment every run shares."""
    from experiments.tiny_setup import prepare_auto_tiny
    from ivtlr_jax.data.synthetic import write_synthetic
    from ivtlr_jax.train.config import TrainConfig

    root = tmp_path_factory.mktemp("multihost")
    write_synthetic(str(root / "data"), n=24, n_eval=8, seed=0)
    tcfg = TrainConfig(init="auto-tiny", out=str(root), data="synthetic", data_source=str(root / "data"))
    prepare_auto_tiny(tcfg, dict(SMALL_MODEL))
    cfg = {"init": tcfg.init, "data": "synthetic", "data_source": str(root / "data"), "epochs_per_stage": 2,
           "max_latent_stage": 3, "k": 4, "finetune": "full", "lr": 1e-3, "batch_size": 8,
           "compute_dtype": "float32", "max_length": 256, "log_every": 1, "save_every": 2, "keep": 10,
           "num_workers": 0, "remat": "none"}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (root / "fault_train.py").write_text(FAULT_MODULE)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS="--xla_backend_optimization_level=0",
               PYTHONPATH=os.pathsep.join([ROOT, str(root)]))
    env.pop("JAX_PLATFORMS", None)
    return root, str(path), env


def flags(cfg, out, *extra):
    return ["--config", cfg, "--stage=2", "--mesh", "tpu_v4_8", "--out", str(out), *extra]


def launch(env, train_flags, *launcher_flags, timeout=300):
    cmd = [sys.executable, "-m", "experiments.launch_local", "--processes", "2", "--devices-per-process", "2",
           *launcher_flags, "--", *train_flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses_by_step(out):
    """step -> loss over every invocation that wrote into RUN_DIR (a later record of a step wins)."""
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def trainable(out, step):
    import jax
    from stored import read_checkpoint

    state, meta = read_checkpoint(os.path.join(out, "checkpoints", str(step)))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state["trainable"])], meta


def lines_of(text, prefix):
    return [line[len(prefix):].strip() for line in text.splitlines() if line.startswith(prefix)]


def summary_of(stdout):
    """The summary JSON process 0 prints last."""
    lines = lines_of(stdout, "[p0]")
    start = len(lines) - 1 - lines[::-1].index("{")
    return json.loads("\n".join(lines[start:]))


class Run:
    """What one invocation left: exit status, output, seconds."""

    def __init__(self, proc, seconds):
        self.returncode, self.stdout, self.stderr, self.seconds = proc.returncode, proc.stdout, proc.stderr, seconds

    def __repr__(self):
        return f"exit {self.returncode} after {self.seconds:.0f} s\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(setup):
    """One 2-process x 2-device run of stage 2 through three faults, and the 1-process x 4-device reference.

    1. SIGTERM to the launcher (passed on to every process) once step 1 is done: one checkpoint, clean exit;
    2. --resume, and process 1 SIGKILLs itself right after its first checkpoint write started;
    3. --resume to the end.
    The reference runs meanwhile (a 2-process run leaves a core idle while process 1 compiles).
    """
    root, cfg, env = setup
    out, one = root / "two_processes", root / "one_process"
    single_env = dict(env, JAX_PLATFORMS="cpu",
                      XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4")
    t_ref = time.time()
    reference = subprocess.Popen([sys.executable, "-m", "experiments.train",
                                  *flags(cfg, one, "--max-steps", str(STEPS))], cwd=ROOT, env=single_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = {"out": out, "one": one}

    t0 = time.time()
    cmd = [sys.executable, "-m", "experiments.launch_local", "--processes", "2", "--devices-per-process", "2", "--",
           *flags(cfg, out, "--max-steps", str(STEPS), "--save-every", "100", "--debug")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None \
            and not os.path.exists(os.path.join(out, "debug", "rows.process_1.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    result["sigterm"] = Run(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), time.time() - t0)
    result["after_sigterm"] = sorted(os.listdir(os.path.join(out, "checkpoints")))

    t0 = time.time()
    killed = launch(dict(env, IVTLR_TEST_KILL="1"),
                    flags(cfg, out, "--resume", "--max-steps", str(STEPS), "--save-every", "2", "--peer-timeout", "8",
                          "--debug"), "--module", "fault_train", "--grace", "120")
    result["kill"] = Run(killed, time.time() - t0)
    result["after_kill"] = sorted(os.listdir(os.path.join(out, "checkpoints")))

    t0 = time.time()
    result["resume"] = Run(launch(env, flags(cfg, out, "--resume", "--max-steps", str(STEPS), "--debug")),
                           time.time() - t0)
    stdout, stderr = reference.communicate(timeout=600)
    result["reference"] = Run(subprocess.CompletedProcess([], reference.returncode, stdout, stderr),
                              time.time() - t_ref)
    print("seconds: " + ", ".join(f"{k} {v.seconds:.0f}" for k, v in result.items() if isinstance(v, Run)))
    return result


def test_two_processes_equal_one_process_and_share_the_rows(runs):
    """2 processes x 2 devices == 1 process x 4 devices (losses, final params); each process read its own rows,
    disjoint, together the global batch; only process 0 writes metrics and the summary."""
    out, one = runs["out"], runs["one"]
    assert runs["reference"].returncode == 0, runs["reference"]
    assert runs["resume"].returncode == 0, runs["resume"]
    two, single = losses_by_step(out), losses_by_step(one)
    assert sorted(two) == list(range(1, STEPS + 1)) == sorted(single)
    np.testing.assert_allclose([two[s] for s in sorted(two)], [single[s] for s in sorted(single)], rtol=1e-5, atol=1e-5)
    (p_two, meta), (p_one, _) = trainable(out, STEPS), trainable(one, STEPS)
    assert meta["process_count"] == 2
    for a, b in zip(p_two, p_one, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    recs = metrics(out)  # one "state" record first per invocation (3), then its steps: process 1 wrote none
    assert recs[0]["event"] == "state" and recs[0]["processes"] == 2
    assert sum(r.get("event") == "state" for r in recs) == 3
    run = runs["resume"]
    assert any('"stopped": "max_steps"' in line for line in lines_of(run.stdout, "[p0]"))
    assert not any('"stopped"' in line for line in lines_of(run.stdout, "[p1]"))
    assert not any(line.startswith("step ") for line in lines_of(run.stdout, "[p1]") + lines_of(run.stderr, "[p1]"))

    from ivtlr_jax.data import BatchIterator

    class Rows:  # the iterator's row order needs only the number of rows
        def __len__(self):
            return 24

    trace = {}
    for pid in (0, 1):
        with open(os.path.join(out, "debug", f"rows.process_{pid}.jsonl")) as f:
            for line in f:  # a step trained again after a fault reads the same rows again
                r = json.loads(line)
                assert trace.setdefault((r["step"], pid), r["rows"]) == r["rows"]
    it = BatchIterator(Rows(), batch_size=8, latent_id=0, pad_id=0, seed=0, num_workers=0)
    for step in range(1, STEPS + 1):
        rows0, rows1 = trace[(step, 0)], trace[(step, 1)]
        assert len(rows0) == len(rows1) == 4 and not set(rows0) & set(rows1), (step, rows0, rows1)
        epoch, index = divmod(step - 1, it.steps_per_epoch)
        assert sorted(rows0 + rows1) == sorted(it.global_rows(4 + epoch, index).tolist())


def test_sigterm_to_every_process_checkpoints_once_and_exits_cleanly(runs):
    run, out = runs["sigterm"], runs["out"]
    assert run.returncode == 0, run
    summary = summary_of(run.stdout)
    stopped_at = summary["step"]
    assert summary["stopped"] == f"signal {int(signal.SIGTERM)}" and 1 <= stopped_at < STEPS, summary
    assert runs["after_sigterm"] == [str(stopped_at)]  # one checkpoint, at the step every process stopped at
    assert [r["step"] for r in metrics(out) if "loss" in r][:stopped_at] == list(range(1, stopped_at + 1))
    assert "[launch] all processes finished" in run.stderr
    assert f"restored resume {stopped_at} (step {stopped_at})" in runs["kill"].stderr  # its one checkpoint


def test_sigkill_during_a_checkpoint_write_then_resume(runs):
    """The survivor exits with a clear line instead of hanging; --resume continues from the last complete
    checkpoint, ignoring the half-written one; losses and params equal the uninterrupted run's (see above)."""
    run, out = runs["kill"], runs["out"]
    stopped_at = summary_of(runs["sigterm"].stdout)["step"]
    text = run.stdout + run.stderr
    assert run.returncode != 0, run
    assert "[p1] test: killing process 1 while checkpoint" in text and \
        "[launch] process 1 was killed by SIGKILL" in text, run
    p0 = "\n".join(lines_of(run.stderr, "[p0]"))
    assert "error: process 0 of 2: process 1 sent no heartbeat for" in p0, run
    assert f"restart every process with --resume: it continues from the last complete checkpoint, step " \
           f"{stopped_at}" in p0
    assert "[launch] process 0 exited with code 3" in text and "still running" not in text  # on its own
    assert run.seconds < 110  # well before the launcher's 120 s grace
    half = [d for d in runs["after_kill"] if not d.isdigit()]
    assert half and all(".orbax-checkpoint-tmp" in d for d in half), runs["after_kill"]
    assert [int(d) for d in runs["after_kill"] if d.isdigit()] == [stopped_at]

    resumed = runs["resume"]
    assert resumed.returncode == 0, resumed
    assert f"restored resume {stopped_at} (step {stopped_at})" in resumed.stderr
    assert all(d.isdigit() for d in os.listdir(os.path.join(out, "checkpoints")))  # the half-written one is gone


def test_launcher_stops_every_process_when_one_fails(tmp_path):
    """launch_local: one process fails -> the others are killed after --grace; each exit is reported."""
    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        import sys, time
        pid = int(sys.argv[sys.argv.index("--process-id") + 1])
        print(f"probe {pid} up", flush=True)
        if pid == 1:
            sys.exit(7)
        time.sleep(120)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.launch_local", "--processes", "2", "--grace", "1",
                           "--module", "probe", "--", "--anything"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert time.time() - t0 < 30
    assert proc.returncode == 7
    assert "[p0] probe 0 up" in proc.stdout and "[p1] probe 1 up" in proc.stdout
    assert "[launch] process 1 exited with code 7" in proc.stderr
    assert "[launch] process 0 still running 1 s after a failure: killing it" in proc.stderr
    assert "[launch] process 0 was killed by SIGKILL" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "experiments.launch_local", "--", "--process-id", "3"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "the launcher sets these itself" in bad.stderr


def readme_launch_command() -> list[str]:
    """The README's multi-process example (`python -m experiments.launch_local ...`, its continuation lines joined)."""
    import shlex

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("python -m experiments.launch_local")
    lines = []
    for line in text[start:].splitlines():
        lines.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(lines))


def test_readme_two_process_command_runs_from_nothing(tmp_path):
    """The README's command as written (plus --max-steps and a temporary --out), nothing prepared beforehand: process
    0 builds the auto-tiny model before the processes join (no collective waits on it), both run to the end."""
    cmd = readme_launch_command()
    assert cmd[:3] == ["python", "-m", "experiments.launch_local"] and "--out" in cmd, cmd
    out = tmp_path / "two_hosts"
    cmd[0] = sys.executable
    cmd[cmd.index("--out") + 1] = str(out)
    cmd += ["--max-steps", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("JAX_PLATFORMS", None)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    run = Run(proc, time.time() - t0)
    print(f"README two-process command: {run.seconds:.0f} s")
    assert proc.returncode == 0, run
    assert "[launch] all processes finished" in proc.stderr, run
    assert summary_of(proc.stdout)["step"] == 2
    assert os.path.exists(out / "init" / "ivtlr_config.json")
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]
    assert not [d for d in os.listdir(out) if d.startswith(".tiny-build-")]  # the build folder was renamed


def test_tiny_model_build_that_fails_leaves_no_init(tmp_path, monkeypatch):
    """A build that stops half-way leaves no RUN_DIR/init that would look complete (it is built aside, then renamed)."""
    import ivtlr_jax.convert as convert
    from experiments.tiny_setup import make_tiny_checkpoint

    real = convert.convert_hf_to_checkpoint

    def half_then_fail(src, dst, **kw):
        real(src, dst, **kw)  # a complete-looking folder, then a crash before the build ends
        raise RuntimeError("killed")

    monkeypatch.setattr(convert, "convert_hf_to_checkpoint", half_then_fail)
    small = {k: v for k, v in SMALL_MODEL.items() if k != "vision"}
    with pytest.raises(RuntimeError, match="killed"):
        make_tiny_checkpoint(str(tmp_path), corpus=["a b c"], model=small, vision=SMALL_MODEL["vision"])
    assert os.listdir(tmp_path) == []


def test_sharded_train_step_on_two_cpu_devices_runs_to_its_end(setup):
    """Issue 18: a train step on 2 simulated CPU devices with gradient accumulation hung at random (the devices at
    different all-gathers) under XLA:CPU's concurrency-optimised scheduler; `import ivtlr_jax` turns it off. The
    issue's command, 5 times in a row (the programs come from the compilation cache after the first run)."""
    root, cfg, env = setup
    env = dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
    for run in range(5):
        out = root / f"two_devices_{run}"
        proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config", cfg, "--stage", "1", "--mesh",
                               "auto", "--batch-size", "8", "--grad-accum", "4", "--max-steps", "2", "--log-every",
                               "1", "--debug", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"run {run}: {proc.stderr[-3000:]}"
        assert sorted(os.listdir(out / "checkpoints")) == ["2"]
        with open(out / "debug" / "rows.process_0.jsonl") as f:
            assert [json.loads(line)["micro"] for line in f] == [0, 1, 2, 3] * 2  # 2 updates of 4 micro-steps
