"""Config values are coerced to their field types on load (PyYAML reads `1e-3` as a string); bad ones are one line."""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from ivtlr_jax.config import coerce
from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.models import model_config_from_dict
from ivtlr_jax.models.chameleon import ChameleonConfig
from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig, VisionConfig
from ivtlr_jax.train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_yaml_lr_1e_3_is_a_float_and_an_optimiser_step_takes_it():
    from ivtlr_jax.train.step import make_optimizer

    values = yaml.safe_load("lr: 1e-3\nweight_decay: 0\nwarmup_steps: '0'\nstages: [1, 2]\n")
    assert values["lr"] == "1e-3"  # what PyYAML gives
    tcfg = TrainConfig.from_dict(values)
    assert tcfg.lr == 0.001 and type(tcfg.lr) is float
    assert tcfg.weight_decay == 0.0 and type(tcfg.weight_decay) is float and tcfg.warmup_steps == 0
    assert tcfg.stages == (1, 2)
    tx, schedule = make_optimizer(tcfg, 10)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.asarray([1.0, -2.0, 0.5])}, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), [0.999, 1.001, 0.999], rtol=1e-6)  # Adam's first step: lr
    assert float(schedule(0)) == pytest.approx(0.001)


def test_cli_reports_a_bad_value_in_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: synthetic\nlr: abc\n")
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config", str(cfg), "--out",
                          str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines == ["config error: lr: 'abc' is not a float"], out.stderr[-2000:]


@pytest.mark.parametrize("value,tp,want", [
    ("1e-3", float, 0.001), (3, float, 3.0), (np.float32(0.5), float, 0.5), ("7", int, 7), (4.0, int, 4),
    ("1e3", int, 1000), (np.int64(9), int, 9), ("true", bool, True), ("False", bool, False), (1, bool, True),
    ([1, "2"], tuple[int, ...], (1, 2)), (5, tuple[int, ...], (5,)), ([16, 24, 24], tuple[int, int, int], (16, 24, 24)),
    (None, int | None, None), ("3", int | None, 3), (12, str, "12"), ("x", str, "x"),
])
def test_coerce(value, tp, want):
    got = coerce(value, tp, "key")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value,tp,message", [
    ("abc", float, "lr: 'abc' is not a float"), (True, float, "lr: True is not a float"),
    (2.5, int, "lr: 2.5 is not an int"), ("maybe", bool, "lr: 'maybe' is not a bool (true or false)"),
    (None, float, "lr: None is not a float"), ("x", int | None, "lr: 'x' is not an int or null"),
    ([1, 2], tuple[int, int, int], "lr: [1, 2] is not a list of 3 ints"),
    ([1, "b"], tuple[int, ...], "lr[1]: 'b' is not an int"), ("12", tuple[int, ...], "lr: '12' is not a list of ints"),
])
def test_coerce_errors_name_key_value_and_type(value, tp, message):
    with pytest.raises(ValueError) as e:
        coerce(value, tp, "lr")
    assert str(e.value) == message


def test_model_sections_are_coerced_alike():
    qwen = model_config_from_dict(yaml.safe_load(
        "model_type: qwen2_vl\nrms_norm_eps: 1e-6\nrope_theta: 1e6\nhidden_size: '3584'\nmrope_section: [16, 24, 24]\n"
        "tie_word_embeddings: 'false'\neos_token_id: [151645]\npad_token_id: null\nvision: {mlp_ratio: '4', depth: 2}"))
    assert qwen.rms_norm_eps == 1e-6 and type(qwen.rms_norm_eps) is float and qwen.rope_theta == 1e6
    assert qwen.hidden_size == 3584 and qwen.mrope_section == (16, 24, 24) and qwen.tie_word_embeddings is False
    assert qwen.vision == VisionConfig(mlp_ratio=4.0, depth=2) and qwen.eos_token_id == (151645,)
    assert Qwen2VLConfig.from_dict(qwen.to_dict()) == qwen
    cham = model_config_from_dict(yaml.safe_load(
        "model_type: chameleon\nrms_norm_eps: 1e-5\neos_token_id: 2\nswin_norm: 'true'\n"
        "vq: {channel_multiplier: [1, 2], attn_resolutions: [], resolution: '64'}"))
    assert cham.rms_norm_eps == 1e-5 and cham.eos_token_id == (2,) and cham.swin_norm is True
    assert cham.vq.channel_multiplier == (1, 2) and cham.vq.attn_resolutions == () and cham.vq.resolution == 64
    assert ChameleonConfig.from_dict(cham.to_dict()) == cham
    with pytest.raises(ValueError, match=r"^vision\.depth: 'two' is not an int$"):
        model_config_from_dict({"vision": {"depth": "two"}})
    with pytest.raises(ValueError, match=r"^rms_norm_eps: 'small' is not a float$"):
        model_config_from_dict({"model_type": "chameleon", "rms_norm_eps": "small"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['vq\.colour'\] for VQConfig"):
        model_config_from_dict({"model_type": "chameleon", "vq": {"colour": 1}})
    assert LatentConfig(k="4", latent_text="no") == LatentConfig(k=4, latent_text=False)


def test_qwen_configs_read_both_hf_layouts_and_name_a_missing_key():
    """The Qwen VL configs share one reader of config.json's LLM half: the 4.x flat layout (rope_theta at the top,
    mrope_section under rope_scaling) and transformers-5's text_config give the same config; a key Qwen2-VL cannot
    default is named, with where it goes."""
    from ivtlr_jax.models.qwen2_5_vl.config import Qwen25VLConfig
    from ivtlr_jax.models.qwen3_vl.config import Qwen3VLConfig

    for cls in (Qwen2VLConfig, Qwen25VLConfig, Qwen3VLConfig):
        vision = dataclasses.replace(cls().vision, out_hidden_size=64)
        cfg = cls(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, eos_token_id=(7, 8),
                  vision=vision,
                  **({"head_dim": 32, "mrope_section": (6, 5, 5)} if cls is Qwen3VLConfig else
                     {"mrope_section": (2, 3, 3)}))
        hf = cfg.to_hf_dict()
        text = hf.pop("text_config")
        rope = text.pop("rope_parameters")
        flat = {**hf, **text, "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", **rope}}
        assert cls.from_hf_dict(flat) == cls.from_hf_dict(cfg.to_hf_dict()) == cfg
    hf = Qwen2VLConfig().to_hf_dict()
    del hf["text_config"]["rope_parameters"]["mrope_section"]
    with pytest.raises(ValueError, match=r"Qwen2-VL config needs mrope_section \(under rope_parameters or rope_scal"):
        Qwen2VLConfig.from_hf_dict(hf)
    for tower, blocks in ((Qwen25VLConfig().vision, "fullatt_block_indexes"),
                          (Qwen3VLConfig().vision, "deepstack_visual_indexes")):
        for change, message in (({"depth": 4}, rf"{blocks} \[.*\] are outside the 4 blocks \(0..3\)"),
                                ({"num_heads": 7}, r"hidden_size=\d+ must be divisible by num_heads=7"),
                                ({"hidden_act": "relu"}, r"hidden_act='relu' is not supported; use one of \[")):
            with pytest.raises(ValueError, match=rf"^vision_config: {message}"):
                dataclasses.replace(tower, **change)


def test_load_reads_what_its_class_names(tmp_path):
    """BackboneConfig.load follows the file's model_type; a backbone's own class reads only its own configs."""
    from ivtlr_jax.models.chameleon.small import tiny_model as tiny_chameleon
    from ivtlr_jax.models.config import BackboneConfig
    from ivtlr_jax.models.qwen2_vl.small import tiny_model as tiny_qwen2vl

    _, qwen = tiny_qwen2vl(None, 400)
    _, cham = tiny_chameleon(None, 400, None, dict(num_embeddings=16))
    qwen.save(str(tmp_path / "q.json"))
    cham.save(str(tmp_path / "c.json"))
    assert BackboneConfig.load(str(tmp_path / "c.json")) == cham
    assert type(qwen).load(str(tmp_path / "q.json")) == qwen
    with pytest.raises(ValueError, match="model_type='chameleon', not 'qwen2_vl'"):
        type(qwen).load(str(tmp_path / "c.json"))
