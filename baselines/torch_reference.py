"""A compact PyTorch reference of ROME, MEMIT, EMMET and AlphaEdit on transformers' LlamaForCausalLM,
Qwen2ForCausalLM or MistralForCausalLM.

Written for this project (not copied) to work the way the reference implementations do
(kmeng01/memit, zjunlp/EasyEdit, scalable-model-editing/unified-model-editing), so that jaxedit can
be checked against it number by number and timed against it:

* keys: one batched forward over every (request, context template) prompt with a forward pre-hook on
  `model.layers[l].mlp.down_proj` that records its input at the subject's last token; averaged within
  each template group, then over groups;
* values: one request at a time, `torch.optim.Adam` on a single delta vector that a forward hook adds
  to the edited decoder layer's output at the subject's last token of every prompt, the full model run
  at every step; loss, clamp and early stop as below;
* solve: MEMIT `R K^T (lam C0 + K K^T)^-1` by `torch.linalg.solve` of the F x F system in float64;
  EMMET with the explicit inverse `C^-1` of C = lam C0 (+ update_norm_lambda I), `D = K^T C^-1 K`
  (+ emmet_lambda I when n > 1), `dW = R D^-1 K^T C^-1`; ROME's rank-one `r u^T / (k^T u)` with
  u = C0^-1 k (its values at the MLP output, keys averaged over all templates at once); AlphaEdit as
  its reference code (jianghoucheng/AlphaEdit) solves it, `dW^T = solve(P (K K^T + K_p K_p^T) + l2 I,
  P K R^T)` with P the projector onto the eigenvectors of C0 whose eigenvalues are below the threshold.

The value optimisation follows jaxedit.editing.values.optimise_values' documented semantics exactly:
prompt tokens with the tokenizer's own special tokens, target = tokenizer(" " + target,
add_special_tokens=False), rewriting prompt = template-filled prompt ids + target ids[:-1],
subject-last-token index = len(tokenize(prefix + subject)) - 1, KL of the next-token distribution at
the subject's last token of "{subject} is a", weight decay v_weight_decay ||delta|| / ||init||^2,
delta clamped to clamp_norm_factor ||init||, stop once loss < early_stop_loss (checked before the
update), at most v_num_grad_steps loss evaluations (so at most v_num_grad_steps - 1 updates).

Editing never leaves the model changed: multi-layer MEMIT writes each layer's update in place (so the
next layer sees it, as the reference does) and restores the weights at the end; the deltas are
returned. Templates and C0 are inputs (the comparison gives both implementations the same ones).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - torch is a test/benchmark extra
    raise ImportError("baselines.torch_reference needs PyTorch: pip install -e '.[test]'") from e

KL_PROMPT = "{} is a"


# ------------------------------------------------------------------------------ model
def torch_model(cfg, params, attn_implementation: str = "sdpa"):
    """transformers' LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM (by cfg.architecture;
    float32, eval mode, no parameter gradients) holding params."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llama3_flax import checkpoint

    hf = cfg.to_hf()
    hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    hf_cfg._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    state = {k: torch.from_numpy(np.array(v, np.float32))
             for k, v in checkpoint.hf_state_dict_from_params(params, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.requires_grad_(False)
    return model


def _layers(model):
    return model.model.layers


def down_proj_weight(model, layer: int) -> torch.Tensor:
    return _layers(model)[layer].mlp.down_proj.weight


# ---------------------------------------------------------------------- tokenisation
def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def target_ids(tokenizer, target: str) -> list[int]:
    ids = _ids(tokenizer, " " + target.strip(), special=False)
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def fill_template(template: str, prompt: str, subject: str) -> tuple[str, str]:
    """(text before the subject, full text): template.format(prompt).format(subject) as the
    reference implementations build their prompts."""
    text = template.replace("{}", prompt, 1)
    cut = text.index("{}")
    return text[:cut], text[:cut] + subject + text[cut + 2:]


def subject_last(tokenizer, prefix: str, subject: str) -> int:
    return len(_ids(tokenizer, prefix + subject)) - 1


def _pad_id(tokenizer) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def _batch(rows: Sequence[Sequence[int]], pad: int):
    """Right-padded (input_ids, attention_mask) int64 tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


# ------------------------------------------------------------------------------ keys
def keys(model, tokenizer, requests, template_groups, layer: int) -> torch.Tensor:
    """(n, F) float32 down_proj inputs at the subject's last token, averaged within each template group
    and then over the groups (one batched forward, a pre-hook on down_proj)."""
    flat = [t for g in template_groups for t in g]
    rows, lookups = [], []
    for r in requests:
        for t in flat:
            prefix, text = fill_template(t, r.prompt, r.subject)
            rows.append(_ids(tokenizer, text))
            lookups.append(subject_last(tokenizer, prefix, r.subject))
    ids, mask = _batch(rows, _pad_id(tokenizer))
    seen = {}

    def pre_hook(module, args):
        seen["k"] = args[0][torch.arange(len(rows)), torch.tensor(lookups)].detach().float()

    handle = _layers(model)[layer].mlp.down_proj.register_forward_pre_hook(pre_hook)
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    k = seen["k"].reshape(len(requests), len(flat), -1)
    per_group, start = [], 0
    for g in template_groups:
        per_group.append(k[:, start:start + len(g)].mean(1))
        start += len(g)
    return torch.stack(per_group, 0).mean(0)


def _site_module(model, layer: int, site: str):
    """The module whose output is the value site: the decoder layer ("resid") or its MLP ("mlp", ROME)."""
    if site not in ("resid", "mlp"):
        raise ValueError(f"site must be 'resid' or 'mlp', got {site!r}")
    return _layers(model)[layer] if site == "resid" else _layers(model)[layer].mlp


def layer_outputs(model, tokenizer, requests, layer: int, site: str = "resid") -> torch.Tensor:
    """(n, D) output of `layer` (its residual output, or with site "mlp" its MLP output) at the
    subject's last token of each bare prompt."""
    rows, lookups = [], []
    for r in requests:
        prefix, text = fill_template("{}", r.prompt, r.subject)
        rows.append(_ids(tokenizer, text))
        lookups.append(subject_last(tokenizer, prefix, r.subject))
    ids, mask = _batch(rows, _pad_id(tokenizer))
    seen = {}

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen["h"] = h[torch.arange(len(rows)), torch.tensor(lookups)].detach().float()

    handle = _site_module(model, layer, site).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return seen["h"]


# ---------------------------------------------------------------------------- values
@dataclasses.dataclass
class TorchValues:
    """Per request (n, ·) numpy float32: target = init + delta; loss at the last evaluation; steps =
    Adam updates made."""

    target: np.ndarray
    init: np.ndarray
    delta: np.ndarray
    loss: np.ndarray
    steps: np.ndarray


def value(model, tokenizer, request, templates: Sequence[str], layer: int, hp, site: str = "resid") -> dict:
    """The target value of one request at `layer`'s residual output (MEMIT's compute_z), or with site
    "mlp" at its MLP output (ROME's): delta is added to the layer's output either way (the MLP output
    is the last term of the residual), init is read at the site.

    Args:
      templates: the flat context templates ("{}" first).
      hp: jaxedit.hparams.ValueHparams.
    """
    tgt = target_ids(tokenizer, request.target_new)
    rows, lookups, targets = [], [], []
    for t in templates:
        prefix, text = fill_template(t, request.prompt, request.subject)
        prompt = _ids(tokenizer, text)
        rows.append(prompt + tgt[:-1])
        lookups.append(subject_last(tokenizer, prefix, request.subject))
        targets.append([len(prompt) - 1 + j for j in range(len(tgt))])
    kl_text = KL_PROMPT.format(request.subject)
    rows.append(_ids(tokenizer, kl_text))
    lookups.append(subject_last(tokenizer, "", request.subject))
    n_rw = len(templates)
    ids, mask = _batch(rows, _pad_id(tokenizer))
    row_idx, look = torch.arange(len(rows)), torch.tensor(lookups)
    tpos = torch.tensor(targets)                            # (n_rw, Tt)
    tid = torch.tensor(tgt)[None, :].expand(n_rw, -1)       # (n_rw, Tt)

    d_model = model.config.hidden_size
    delta = torch.zeros(d_model, requires_grad=True)
    state = {"init": None}

    def read_init(module, args, out):
        if state["init"] is None:
            h = out[0] if isinstance(out, tuple) else out
            state["init"] = h[0, lookups[0]].detach().clone()

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.index_put((row_idx, look), delta.expand(len(rows), d_model).to(h.dtype), accumulate=True)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    init_handle = _site_module(model, layer, site).register_forward_hook(read_init)
    handle = _layers(model)[layer].register_forward_hook(hook)
    kl_init, loss, steps = None, None, 0
    try:
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            lp = torch.log_softmax(logits[torch.arange(n_rw)[:, None], tpos].float(), dim=-1)
            nll = -lp.gather(-1, tid[..., None])[..., 0].sum(1) / len(tgt)
            kl_lp = torch.log_softmax(logits[n_rw, lookups[n_rw]].float(), dim=-1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = torch.sum(kl_lp.exp() * (kl_lp - kl_init))
            wd = hp.v_weight_decay * torch.norm(delta) / torch.norm(state["init"]) ** 2
            loss = nll.mean() + hp.kl_factor * kl + wd
            if loss.item() < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            max_norm = hp.clamp_norm_factor * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
        init_handle.remove()
    init = state["init"].numpy()
    d = delta.detach().numpy().copy()
    return {"target": init + d, "init": init, "delta": d, "loss": float(loss.item()), "steps": steps}


def values(model, tokenizer, requests, templates: Sequence[str], layer: int, hp, site: str = "resid") -> TorchValues:
    """Target values of every request, optimised one request at a time."""
    out = [value(model, tokenizer, r, templates, layer, hp, site) for r in requests]
    stack = lambda k, dt=np.float32: np.asarray([o[k] for o in out], dt)
    return TorchValues(target=stack("target"), init=stack("init"), delta=stack("delta"), loss=stack("loss"),
                       steps=stack("steps", np.int32))


# ----------------------------------------------------------------------------- solves
def _f64(x) -> torch.Tensor:
    return x.double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float64))


def memit_solve(C0, K, R, lam: float) -> torch.Tensor:
    """MEMIT: dW = R K^T (lam C0 + K K^T)^-1, as R @ solve(lam C0 + K K^T, K)^T in float64.

    C0 (F, F), K (F, n), R (D, n) -> dW (D, F) float64.
    """
    C0, K, R = (_f64(x) for x in (C0, K, R))
    adj_k = torch.linalg.solve(lam * C0 + K @ K.T, K)
    return R @ adj_k.T


def emmet_solve(C0, K, R, lam: float, emmet_lambda: float, update_norm_lambda: float = 0.0) -> torch.Tensor:
    """EMMET: C = lam C0 (+ update_norm_lambda I), D = K^T C^-1 K (+ emmet_lambda I when n > 1),
    dW = R D^-1 K^T C^-1, with C^-1 and D^-1 explicit inverses in float64. Returns (D, F) float64."""
    C0, K, R = (_f64(x) for x in (C0, K, R))
    C = lam * C0 if lam != 1 else C0.clone()
    if update_norm_lambda:
        C = C + update_norm_lambda * torch.eye(C.shape[0], dtype=C.dtype)
    C_inv = torch.inverse(C)
    D = K.T @ C_inv @ K
    if D.shape[0] > 1:
        D = D + emmet_lambda * torch.eye(D.shape[0], dtype=D.dtype)
    adj_k = (torch.inverse(D) @ K.T @ C_inv).T
    return R @ adj_k.T


def rome_solve(C0, k, r) -> torch.Tensor:
    """ROME's rank-one update dW = r u^T / (k^T u), u = C0^-1 k, in float64. C0 (F, F), k (F,) or
    (F, 1), r (D,) or (D, 1) -> (D, F)."""
    C0, k, r = (_f64(x) for x in (C0, k, r))
    k, r = k.reshape(-1), r.reshape(-1)
    u = torch.linalg.solve(C0, k)
    return torch.outer(r, u) / (k @ u)


def alphaedit_solve(C0, K, R, threshold: float, l2: float, previous_keys=None) -> torch.Tensor:
    """AlphaEdit's update as its reference code solves it, in float64: P = U_0 U_0^T over the
    eigenvectors of C0 with eigenvalues below `threshold`, dW^T = solve(P (K K^T + K_p K_p^T) + l2 I,
    P K R^T). C0 (F, F), K (F, n), R (D, n), previous_keys (F, m) or None -> (D, F)."""
    C0, K, R = (_f64(x) for x in (C0, K, R))
    evals, evecs = torch.linalg.eigh(C0)
    null = evecs[:, evals < threshold]
    P = null @ null.T
    kept = K @ K.T if previous_keys is None else K @ K.T + _f64(previous_keys) @ _f64(previous_keys).T
    lhs = P @ kept + l2 * torch.eye(C0.shape[0], dtype=C0.dtype)
    return torch.linalg.solve(lhs, P @ K @ R.T).T


# ------------------------------------------------------------------------------- edit
@dataclasses.dataclass
class TorchEdit:
    """What a baseline edit computed (numpy): per-layer deltas (D, F) and keys (n, F), the values, the
    residual written per layer (n, D), and seconds per stage (keys includes the current outputs)."""

    method: str
    layers: tuple[int, ...]
    deltas: dict
    keys: dict
    residuals: dict
    values: TorchValues
    seconds: dict


def edit(model, tokenizer, requests, hparams, *, covariances: Mapping[int, object], templates,
         given_values: TorchValues | None = None) -> TorchEdit:
    """ROME, MEMIT, EMMET or AlphaEdit on `model` (left unchanged) for a batch of EditRequests.

    Args:
      hparams: jaxedit.hparams.EditHparams (method "rome", "memit", "emmet" or "alphaedit").
      covariances: {layer: C0 (F, F)} (numpy / jax / torch), unscaled.
      templates: context template groups (("{}",), (...), ...), as jaxedit.editing.templates makes them.
      given_values: precomputed TorchValues to skip the value optimisation (timed as 0).
    """
    method = hparams.method
    if method not in ("rome", "memit", "emmet", "alphaedit"):
        raise NotImplementedError(f"the PyTorch baseline implements ROME, MEMIT, EMMET and AlphaEdit, not {method!r}")
    if method == "rome" and (len(requests) != 1 or len(hparams.layers) != 1):
        raise ValueError("ROME edits one request at one layer")
    groups = tuple(tuple(g) for g in templates)
    flat = [t for g in groups for t in g]
    site = "mlp" if method == "rome" else "resid"
    if method == "rome":  # ROME averages its keys over all templates at once
        groups = (tuple(flat),)
    z_layer = hparams.layers[-1]
    seconds = {"keys": 0.0, "values": 0.0, "solve": 0.0}
    t0 = time.perf_counter()
    vals = given_values
    if vals is None:
        vals = values(model, tokenizer, requests, flat, z_layer, hparams.value, site)
    seconds["values"] = time.perf_counter() - t0
    zs = torch.from_numpy(np.array(vals.target, np.float64)).T  # (D, n)

    originals = {l: down_proj_weight(model, l).detach().clone() for l in hparams.layers}
    deltas, written, residuals = {}, {}, {}
    try:
        for i, layer in enumerate(hparams.layers):
            t0 = time.perf_counter()
            K = keys(model, tokenizer, requests, groups, layer).T.double()       # (F, n)
            cur = layer_outputs(model, tokenizer, requests, z_layer, site).T.double()  # (D, n)
            resid = (zs - cur) / (len(hparams.layers) - i)
            seconds["keys"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            C0 = _f64(covariances[layer])
            if method == "memit":
                dW = memit_solve(C0, K, resid, hparams.mom2_update_weight)
            elif method == "emmet":
                dW = emmet_solve(C0, K, resid, hparams.mom2_update_weight, hparams.emmet_lambda)
            elif method == "rome":
                dW = rome_solve(C0, K, resid)
            else:
                dW = alphaedit_solve(C0, K, resid, hparams.nullspace_threshold, hparams.l2)
            with torch.no_grad():
                down_proj_weight(model, layer)[...] = originals[layer] + dW.float()
            seconds["solve"] += time.perf_counter() - t0
            deltas[layer] = dW.float().numpy()
            written[layer] = K.T.float().numpy()
            residuals[layer] = resid.T.float().numpy()
    finally:
        with torch.no_grad():
            for layer, w in originals.items():
                down_proj_weight(model, layer)[...] = w
    return TorchEdit(method=method, layers=tuple(hparams.layers), deltas=deltas, keys=written,
                     residuals=residuals, values=vals, seconds=seconds)


def score_prompts(model, tokenizer, pairs: Sequence[tuple[str, str, str]]) -> np.ndarray:
    """Mean-token NLL of (prompt, target_new, target_true) pairs, one forward per prompt (its two
    continuations as a batch of 2), the way the reference evaluators score CounterFact prompts.

    Returns (len(pairs), 2) float64: NLL of target_new and of target_true.
    """
    out = np.zeros((len(pairs), 2))
    pad = _pad_id(tokenizer)
    with torch.inference_mode():
        for i, (prompt, new, true) in enumerate(pairs):
            p = _ids(tokenizer, prompt)
            tgts = [target_ids(tokenizer, new), target_ids(tokenizer, true)]
            ids, mask = _batch([p + t for t in tgts], pad)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            lp = torch.log_softmax(logits.float(), dim=-1)
            for j, t in enumerate(tgts):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(t))
                out[i, j] = -lp[j, pos, torch.tensor(t)].double().mean().item()
    return out
