"""Sequence and token classification (reward models, process reward models): the decoder
plus a linear ``score`` head, in transformers' ``...ForSequenceClassification`` and
``...ForTokenClassification`` layouts.

Parameters are ``model.*`` (the decoder, as in ``CausalLM``) and ``score.weight``
[num_labels, hidden]: without bias for sequence classification, with ``score.bias`` for
token classification (transformers' default, ``token_classification_bias``), so checkpoints
load in ``transformers.AutoModelFor{Sequence,Token}Classification`` by name. A sequence
classifier reads its score where transformers does: the rightmost token that is not
``pad_token_id`` (with right padding, the last real token). A token classifier scores every
position.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from jaxpt.models.config import config_from_hf, hf_config_from_dict
from jaxpt.models.decoder import CausalLM
from jaxpt.models.hf_io import (
    _attach_hf_config,
    _model_kwargs,
    _tensor_files,
    hf_config_of,
    hf_names,
    load_state,
    resolve_model_dir,
    save_pretrained,
    state_shardings,
)
from jaxpt.models.presets import preset_config
from jaxpt.sharding import make_mesh

log = logging.getLogger(__name__)

HEAD_PREFIX = "score."
# The head's kind -> the HF architecture suffix that replaces "ForCausalLM".
KINDS = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}


class ScoreHead(nnx.Module):
    """``score``: a Linear hidden -> num_labels (with ``bias`` or none), weight in HF layout
    [out, in]."""

    def __init__(self, hidden_size, num_labels, *, rngs, std, dtype, param_dtype, bias=False):
        self.weight = nnx.Param(
            std * jax.random.normal(rngs.params(), (num_labels, hidden_size), param_dtype),
            logical_axes=(None, "embed"),
        )
        self.bias = (nnx.Param(jnp.zeros((num_labels,), param_dtype), logical_axes=(None,))
                     if bias else None)
        self.dtype = dtype

    def __call__(self, h_bd):
        return self.per_token(h_bd[:, None])[:, 0].astype(self.dtype)

    def per_token(self, h_btd):
        """Float32 scores [B, T, num_labels] of hidden states [B, T, D]."""
        weight = self.weight[...].astype(self.dtype)
        out_btl = jnp.einsum("btd,ld->btl", h_btd, weight)
        if self.bias is not None:
            out_btl = out_btl + self.bias[...].astype(self.dtype)[None, None, :]
        return out_btl.astype(jnp.float32)


def read_positions(input_ids_bt, real_bt=None, pad_token_id: int | None = None):
    """Index [B] of the token each row's score is read at: the rightmost token that is real
    (``real_bt != 0``, e.g. segment ids) and not ``pad_token_id``; 0 for an empty row."""
    ids_bt = jnp.asarray(input_ids_bt)
    keep_bt = jnp.ones(ids_bt.shape, bool) if real_bt is None else jnp.asarray(real_bt) != 0
    if pad_token_id is not None:
        keep_bt = keep_bt & (ids_bt != pad_token_id)
    t_bt = jnp.broadcast_to(jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape)
    return jnp.argmax(jnp.where(keep_bt, t_bt, -1), axis=1).astype(jnp.int32)


class SequenceClassifier(CausalLM):
    """Decoder + ``score`` head; returns float32 scores [B, num_labels] at the read position.

    A ``CausalLM`` without an LM head: the forward pass is the parent's with
    ``return_hidden=True``.
    """

    kind = "sequence"

    def __init__(
        self,
        config,
        *,
        rngs: nnx.Rngs,
        num_labels: int = 1,
        pad_token_id: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        attention_impl: str | None = None,
        scan_layers: bool | None = None,
        head_bias: bool = False,
    ):
        super().__init__(
            config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
            attention_impl=attention_impl, lm_head=False, scan_layers=scan_layers,
        )
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.score = ScoreHead(
            config.hidden_size,
            num_labels,
            rngs=rngs,
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            bias=head_bias,
        )

    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None):
        h_btd = super().__call__(
            input_ids, positions, segment_ids, attention_mask, return_hidden=True
        )
        real_bt = segment_ids if segment_ids is not None else attention_mask
        index_b = read_positions(input_ids, real_bt, self.pad_token_id)
        h_bd = jnp.take_along_axis(h_btd, index_b[:, None, None], axis=1)[:, 0]
        return self.score(h_bd).astype(jnp.float32)

    def token_scores(self, input_ids, positions=None, segment_ids=None):
        """Float32 scores [B, T, num_labels] at every position (a critic's per-token values):
        the head applied to each position's hidden state, not only the read position's."""
        h_btd = super().__call__(input_ids, positions, segment_ids, return_hidden=True)
        return self.score.per_token(h_btd)


class TokenClassifier(SequenceClassifier):
    """Decoder + ``score`` head at every position: float32 scores [B, T, num_labels] (a
    process reward model's per-step logits, read at each step's last token)."""

    kind = "token"

    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None):
        real_bt = segment_ids if segment_ids is not None else attention_mask
        return self.token_scores(input_ids, positions, real_bt)


# ------------------------------------------------------------------- HF config and I/O


def classifier_hf_config(hf_config, *, num_labels: int = 1, pad_token_id: int | None = None,
                         kind: str = "sequence", head_bias: bool | None = None):
    """A copy of a causal-LM (or classifier) HF config as ``...ForSequenceClassification``
    (``kind`` "sequence") or ``...ForTokenClassification`` ("token"; ``head_bias`` written as
    ``token_classification_bias``)."""
    out = hf_config.__class__.from_dict(hf_config.to_dict())
    arch = config_from_hf(out).architecture.replace("ForCausalLM", KINDS[kind])
    out.architectures = [arch]
    out.num_labels = num_labels
    if pad_token_id is not None:
        out.pad_token_id = pad_token_id
    if kind == "token" and head_bias is not None:
        out.token_classification_bias = bool(head_bias)
    return out


def classifier_kind(hf_config) -> str | None:
    """"token" or "sequence" for a classifier checkpoint's config, None for another model."""
    for arch in getattr(hf_config, "architectures", None) or ():
        for kind, suffix in KINDS.items():
            if arch.endswith(suffix):
                return kind
    return None


def _build_fn(config, num_labels, pad_token_id, kwargs, kind="sequence", head_bias=False):
    cls = TokenClassifier if kind == "token" else SequenceClassifier

    def build(seed):
        return cls(
            config,
            rngs=nnx.Rngs(seed),
            num_labels=num_labels,
            pad_token_id=pad_token_id,
            head_bias=head_bias,
            **kwargs,
        )

    return build


def _materialize(build, seed, mesh, rules, tensors=None, model_dir=None):
    """Build on the mesh: every tensor found in ``tensors`` is loaded onto its sharding, the
    rest (only the score head may be missing) is randomly initialized from ``seed``."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: build(0)))
    shardings = state_shardings(abstract_state, mesh, rules)
    flat = list(nnx.to_flat_state(abstract_state))
    names = {path: hf_names(path, var) for path, var in flat}
    missing = [
        p for p, _ in flat if tensors is None or any(n not in tensors for n in names[p])
    ]
    bad = [
        n
        for p in missing
        for n in names[p]
        if tensors is not None and n not in tensors and not n.startswith(HEAD_PREFIX)
    ]
    if bad:
        raise KeyError(f"{model_dir}: checkpoint is missing tensor {bad[0]!r}")
    parts = {}
    if tensors is not None:
        present = nnx.from_flat_state([(p, v) for p, v in flat if p not in missing])
        parts.update(nnx.to_flat_state(load_state(present, tensors, mesh, rules, model_dir)))
    if missing:
        flat_shardings = dict(nnx.to_flat_state(shardings))
        wanted = set(missing)

        def init():  # the whole model is traced; XLA drops what is not returned
            state = nnx.state(build(seed))
            return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if p in wanted])

        out_shardings = nnx.from_flat_state([(p, flat_shardings[p]) for p in missing])
        parts.update(nnx.to_flat_state(jax.jit(init, out_shardings=out_shardings)()))
    state = nnx.from_flat_state([(p, parts[p]) for p, _ in flat])
    return nnx.merge(graphdef, state)


def init_classifier(
    config,
    *,
    seed: int = 0,
    mesh=None,
    rules=None,
    num_labels: int = 1,
    pad_token_id: int | None = None,
    dtype="float32",
    param_dtype="float32",
    remat: str = "none",
    attention_impl: str | None = None,
    scan_layers: bool | None = None,
    kind: str = "sequence",
) -> SequenceClassifier:
    """A randomly initialized classifier (seeded) from an HF config (object or dict); ``kind``
    "token" gives a ``TokenClassifier`` (its head with a bias, as transformers builds it)."""
    hf_config = config if not isinstance(config, dict) else hf_config_from_dict(config)
    pad_token_id = _pad_id(hf_config, pad_token_id)
    kwargs = _model_kwargs(dtype, param_dtype, remat, attention_impl, scan_layers)
    mesh = mesh if mesh is not None else make_mesh({}, devices=jax.devices()[:1])
    head_bias = kind == "token"
    build = _build_fn(config_from_hf(hf_config), num_labels, pad_token_id, kwargs, kind,
                      head_bias)
    model = _materialize(build, seed, mesh, rules)
    _attach_hf_config(model, classifier_hf_config(
        hf_config, num_labels=num_labels, pad_token_id=pad_token_id, kind=kind,
        head_bias=head_bias))
    return model


def classifier_from_pretrained(
    name_or_path: str,
    *,
    seed: int = 0,
    mesh=None,
    rules=None,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
    dtype="float32",
    param_dtype="float32",
    remat: str = "none",
    attention_impl: str | None = None,
    scan_layers: bool | None = None,
    kind: str | None = None,
) -> SequenceClassifier:
    """Load a ``...ForSequenceClassification`` or ``...ForTokenClassification`` checkpoint
    (``kind`` None: the checkpoint's), or a causal-LM checkpoint whose ``lm_head`` is ignored
    and whose ``score`` head (``kind`` "sequence" unless given) is initialized from
    ``seed``."""
    model_dir = resolve_model_dir(name_or_path)
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    tensors = _tensor_files(model_dir)
    has_head = any(name.startswith(HEAD_PREFIX) for name in tensors)
    saved_kind = classifier_kind(hf_config) if has_head else None
    if kind is not None and saved_kind is not None and kind != saved_kind:
        raise ValueError(f"{model_dir}: a {saved_kind} classifier checkpoint "
                         f"({hf_config.architectures[0]}), asked to load as a {kind} classifier")
    kind = kind or saved_kind or "sequence"
    if kind not in KINDS:
        raise ValueError(f"classifier kind must be one of {list(KINDS)}, got {kind!r}")
    if num_labels is None:
        num_labels = int(getattr(hf_config, "num_labels", 1)) if has_head else 1
    pad_token_id = _pad_id(hf_config, pad_token_id)
    kwargs = _model_kwargs(dtype, param_dtype, remat, attention_impl, scan_layers)
    mesh = mesh if mesh is not None else make_mesh({}, devices=jax.devices()[:1])
    head_bias = kind == "token" and (
        f"{HEAD_PREFIX}bias" in tensors
        or (not has_head and getattr(hf_config, "token_classification_bias", True))
    )
    build = _build_fn(config_from_hf(hf_config), num_labels, pad_token_id, kwargs, kind,
                      head_bias)
    if not has_head:
        log.info("%s: no score head in the checkpoint; initializing it (seed %d)", model_dir, seed)
    model = _materialize(build, seed, mesh, rules, tensors, model_dir)
    _attach_hf_config(model, classifier_hf_config(
        hf_config, num_labels=num_labels, pad_token_id=pad_token_id, kind=kind,
        head_bias=head_bias))
    return model


def load_classifier(name_or_path: str, *, seed: int = 0, **kwargs) -> SequenceClassifier:
    """A preset name (random init, seeded) or a checkpoint dir (see
    ``classifier_from_pretrained``)."""
    config = preset_config(name_or_path)
    if config is not None and not os.path.isdir(name_or_path):
        return init_classifier(config, seed=seed, **kwargs)
    return classifier_from_pretrained(name_or_path, seed=seed, **kwargs)


def save_classifier(model: SequenceClassifier, out_dir: str, *, dtype=None,
                    extra_config: dict | None = None) -> str:
    """Write the ``...ForSequenceClassification`` (or ``...ForTokenClassification``)
    checkpoint, its config with num_labels and pad_token_id (and ``extra_config``'s keys),
    that ``transformers.AutoModelFor{Sequence,Token}Classification`` loads."""
    hf_config = classifier_hf_config(
        hf_config_of(model), num_labels=model.num_labels, pad_token_id=model.pad_token_id,
        kind=model.kind, head_bias=model.score.bias is not None,
    )
    for key, value in (extra_config or {}).items():
        setattr(hf_config, key, value)
    return save_pretrained(model, out_dir, dtype=dtype, hf_config=hf_config)


def _pad_id(hf_config, pad_token_id):
    if pad_token_id is not None:
        return int(pad_token_id)
    value = getattr(hf_config, "pad_token_id", None)
    return None if value is None else int(value)
