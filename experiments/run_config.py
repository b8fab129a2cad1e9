"""A run's model config from where the run takes its model, without reading weights: `--init CKPT`, the
auto-tiny default or a training YAML's `model:` section. The dry runs of `experiments.train`,
`experiments.evaluate` and `experiments.fit_micro_batch` size their programs with it."""

from __future__ import annotations

import os

from experiments.tiny_setup import AUTO_TINY, config_path, tiny_model_config


def dry_run_model_config(tcfg, yaml_values, backbone: str | None = None):
    """The model config a dry run sizes, from wherever the run would take its model: `--init CKPT` (its saved
    config), the auto-tiny default (the tiny model's config, built without weights; a YAML `model:` section
    overrides its sizes as it does for training), or else the YAML's `model:` section."""
    from ivtlr_jax.models import model_config_from_dict

    model = dict(yaml_values.get("model") or {})
    if backbone:
        model["backbone"] = backbone
    if tcfg.init == AUTO_TINY:
        return tiny_model_config(tcfg, model)
    if tcfg.init and os.path.isdir(tcfg.init):
        from ivtlr_jax.convert.checkpoint import load_config

        return load_config(tcfg.init)
    model.pop("backbone", None)
    if not model:
        where = f"--init {tcfg.init!r} is not a checkpoint folder and " if tcfg.init else ""
        raise SystemExit(f"--dry-run needs the model's shape: {where}give --init CKPT_DIR (a converted checkpoint; "
                         "only its config is read), a `model:` section in the YAML (see "
                         "experiments/configs/qwen2vl_7b_m3cot.yaml), or the auto-tiny default")
    return model_config_from_dict(model)


def yaml_model_config(config: str, backbone: str | None = None):
    """The model config a training YAML (`--config NAME`) trains, as its --dry-run sizes it (no weights read)."""
    import yaml

    from ivtlr_jax.train.config import TrainConfig

    with open(config_path(config)) as f:
        values = yaml.safe_load(f) or {}
    tcfg = TrainConfig.from_dict({k: v for k, v in values.items() if k != "model"})
    return dry_run_model_config(tcfg, values, backbone)
