"""Layer rematerialisation, a training choice: the policies, "auto" by model size, and the layer wrappers the
train step hands the decoder and the image encoder (the model itself only calls the wrapper it is given; the
wrapper also carries the run's `unroll`, see `layers.LayerWrapper`)."""

from __future__ import annotations

import dataclasses

import jax

from ivtlr_jax.models.layers import ATTENTION_DOTS, DecoderDims, LayerWrapper

# layer rematerialisation: auto = by model size (resolve_remat); full keeps least memory
REMAT_CHOICES = ("auto", "full", "dots_except_mlp", "dots", "none")
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # least memory: recompute each layer in backward
    # keep the attention projections and the attention output, recompute the MLP (the widest activations)
    "dots_except_mlp": jax.checkpoint_policies.save_only_these_names(*ATTENTION_DOTS),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep every projection output
    "none": jax.checkpoint_policies.everything_saveable,
}
AUTO_REMAT_DOTS_MAX_PARAMS = 4e9  # "auto": save every dot up to this many decoder params, else all but the MLP's
assert set(REMAT_CHOICES) == {"auto", *REMAT_POLICIES}


def check_remat(name: str) -> str:
    if name not in REMAT_CHOICES:
        raise ValueError(f"remat={name!r} is not valid; use one of {list(REMAT_CHOICES)}")
    return name


def resolve_remat(name: str, d: DecoderDims) -> str:
    """The policy "auto" stands for, by model size: every dot saved for models up to
    AUTO_REMAT_DOTS_MAX_PARAMS decoder parameters, all but the MLP's above (the dry run shows the cost)."""
    if check_remat(name) != "auto":
        return name
    return "dots" if d.num_params <= AUTO_REMAT_DOTS_MAX_PARAMS else "dots_except_mlp"


@dataclasses.dataclass(frozen=True)
class Remat(LayerWrapper):
    """A layer wrapper: the layer function under jax.checkpoint with the named policy ("none" saves everything:
    no recomputation). Hashable by its policy and `unroll`, so a jitted function may take it as a static argument."""

    policy: str

    def __post_init__(self):
        if check_remat(self.policy) == "auto":
            raise ValueError("remat='auto' depends on the model size: resolve it with resolve_remat(name, dims) first")

    def __call__(self, fn):
        return jax.checkpoint(fn, policy=REMAT_POLICIES[self.policy])


def layer_wrapper(name: str, d: DecoderDims, unroll: bool = False) -> Remat:
    """The decoder layer wrapper of a `remat` option ("auto" resolved by the decoder's size)."""
    return Remat(resolve_remat(name, d), unroll=unroll)


def vision_wrapper(unroll: bool = False) -> Remat:
    """The image encoder's wrapper: it runs forward only in training (frozen), its blocks with the least memory."""
    return Remat("full", unroll=unroll)
