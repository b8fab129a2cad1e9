"""LoRA dropout as PEFT draws it: a fresh mask for every decoder call (prefix, each latent chunk, suffix)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from test_latent import LATENT, latent_batch

from ivtlr_jax import IVTLRModel
from ivtlr_jax.latent import LatentConfig, latent_hidden, latent_loss, make_latent_batch, to_device
from ivtlr_jax.models.layers import for_call
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.lora import LoRALinear, apply_lora, init_lora
from ivtlr_jax.train.step import assemble_params

RANK, ALPHA = 4, 8.0
N = 2  # latent steps: two chunks


@pytest.fixture(scope="module")
def setup(tiny_pair):
    """The tiny model with latent ids, LoRA adapters with a nonzero B, and a device batch with two chunks."""
    _, m = tiny_pair
    cfg = dataclasses.replace(m.config, latent_token_id=LATENT, start_latent_token_id=294, end_latent_token_id=295)
    m = IVTLRModel(cfg, m.params)
    bb = m.backbone
    adapters = init_lora(bb.param_spec(), RANK, jax.random.PRNGKey(0))
    adapters = jax.tree.map(lambda x: x + 0.3 if x is not None else None, adapters)  # B != 0: the adapters act
    lcfg = LatentConfig(k=4)
    ids, mask, labels, pv, grid = latent_batch(N)
    batch = to_device(make_latent_batch(bb, lcfg, ids, mask, labels, pv, grid))
    return m, adapters, lcfg, batch


records = []  # (key bytes, keep mask) of every LoRA call, filled by RecordingLoRA


@struct.dataclass
class RecordingLoRA(LoRALinear):
    """A LoRALinear that reports each key and keep mask it uses (a host callback per call and layer)."""

    def keep_mask(self, shape):
        keep = super().keep_mask(shape)
        jax.debug.callback(lambda k, m: records.append((np.asarray(k).tobytes(), np.asarray(m))), self.key, keep)
        return keep


def recording(params):
    is_lora = lambda x: isinstance(x, LoRALinear)
    return jax.tree.map(lambda x: RecordingLoRA(x.base, x.a, x.b, x.key, scale=x.scale, rate=x.rate)
                        if is_lora(x) else x, params, is_leaf=is_lora)


def test_every_call_and_latent_chunk_draws_its_own_mask(setup):
    """A real latent forward with LoRA dropout: prefix, chunk 0, chunk 1 and suffix use distinct keys in every
    layer and adapter, and the two chunks' masks differ (one key per train step reused them before)."""
    m, adapters, lcfg, batch = setup
    params = apply_lora(m.params, adapters, ALPHA / RANK, dropout=0.5, key=jax.random.PRNGKey(7))
    records.clear()
    hidden, _ = latent_hidden(m.backbone, recording(params), lcfg, batch)
    jax.block_until_ready(hidden)
    jax.effects_barrier()
    layers, adapters_per_layer, calls = m.config.num_hidden_layers, 7, 1 + N + 1
    assert len(records) == layers * adapters_per_layer * calls
    assert len({k for k, _ in records}) == len(records)  # no key used twice
    chunk_masks = [mk for _, mk in records if mk.shape[1] == lcfg.chunk_len]
    assert len(chunk_masks) == layers * adapters_per_layer * N
    distinct = {mk.tobytes() for mk in chunk_masks}
    assert len(distinct) == len(chunk_masks)
    kept = np.mean([mk.mean() for _, mk in records])
    assert 0.45 < kept < 0.55  # rate 0.5


def test_same_key_same_loss_and_zero_dropout_is_no_dropout(setup):
    """The masks derive from the step's key only (a resumed step redraws them exactly); lora_dropout 0 with a
    key is exactly the model without dropout."""
    m, adapters, lcfg, batch = setup
    bb = m.backbone
    loss = jax.jit(lambda p: latent_loss(bb, p, lcfg, batch))

    def assembled(dropout, key):
        tcfg = TrainConfig(lora_r=RANK, lora_alpha=ALPHA, lora_dropout=dropout)
        return assemble_params(bb, adapters, m.params, tcfg, jnp.float32, key)

    key = jax.random.PRNGKey(3)
    none = float(loss(assembled(0.05, None)))  # no key: no dropout
    assert float(loss(assembled(0.0, key))) == none
    drop = float(loss(assembled(0.3, key)))
    assert drop != none and float(loss(assembled(0.3, key))) == drop
    assert float(loss(assembled(0.3, jax.random.PRNGKey(4)))) != drop


def test_for_call_folds_keys_and_leaves_plain_params_alone(setup):
    m, adapters, _, _ = setup
    for a, b in zip(jax.tree.leaves(for_call(m.params, 3)), jax.tree.leaves(m.params)):
        assert a is b
    params = apply_lora(m.params, adapters, ALPHA / RANK, dropout=0.1, key=jax.random.PRNGKey(1))
    q = params.llm.layers.q
    keys = [np.asarray(for_call(params, i).llm.layers.q.key) for i in (0, 1)]
    assert keys[0].shape == np.asarray(q.key).shape  # one key per layer, still
    assert not (keys[0] == keys[1]).all(axis=-1).any()
    traced = jax.jit(lambda p, i: for_call(p, i).llm.layers.q.key)(params, jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(traced), keys[1])
