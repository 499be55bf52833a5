"""Single-objective training: retrieval-only (`loss.lm_weight: 0`) and generation-only
(`loss.retrieval_weight: 0`) batches compute exactly the terms of the joint batch they keep."""

from __future__ import annotations

import random

import pytest
import torch

from onegen.collate import Collator
from onegen.config import LossConfig
from onegen.errors import OneGenError
from onegen.losses import Objective


def _batches(model, corpus, samples, **kinds):
    rendered = [model.renderer.render(s) for s in samples[:6]]
    rendered = [r for r in rendered if r is not None and r.ret_positions]
    make = lambda **kw: Collator(corpus, model.renderer.encode_document, model.ids.pad, 2, True, **kw)  # noqa: E731
    return make()(rendered, random.Random(0)), make(**kinds)(rendered, random.Random(0))


def _terms(model, batch, cfg):
    out = model(batch)
    return Objective(cfg)(out, batch, model.logits, float(len(batch["lm_targets"])),
                          float(len(batch["query_targets"]))), out


def test_retrieval_only_batch_cuts_after_last_query_and_keeps_the_vectors(tiny_model, corpus, samples):
    joint, ret_only = _batches(tiny_model, corpus, samples, lm=False)
    assert ret_only["input_ids"].shape[1] < joint["input_ids"].shape[1]  # answers after [RQ] are cut
    assert ret_only["lm_targets"].numel() == 0
    with torch.no_grad():
        (jt, jo), (rt, ro) = _terms(tiny_model, joint, LossConfig()), _terms(tiny_model, ret_only,
                                                                             LossConfig(lm_weight=0.0))
    # causal: the query vectors of the cut samples are those of the full samples
    torch.testing.assert_close(ro["query_vecs"], jo["query_vecs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rt["retrieval_loss"], jt["retrieval_loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rt["loss"], jt["retrieval_loss"], atol=1e-5, rtol=1e-5)


def test_generation_only_batch_has_no_documents_and_the_same_lm_loss(tiny_model, corpus, samples):
    joint, gen_only = _batches(tiny_model, corpus, samples, retrieval=False)
    assert gen_only["doc_input_ids"].numel() == 0 and gen_only["query_targets"].numel() == 0
    assert torch.equal(gen_only["lm_targets"], joint["lm_targets"])
    with torch.no_grad():
        (jt, _), (gt, _) = _terms(tiny_model, joint, LossConfig()), _terms(tiny_model, gen_only,
                                                                           LossConfig(retrieval_weight=0.0))
    torch.testing.assert_close(gt["loss"], jt["lm_loss"], atol=1e-5, rtol=1e-5)


def test_single_objective_step_has_gradients(fresh_model, corpus, samples):
    for kinds, cfg in (({"lm": False}, LossConfig(lm_weight=0.0)), ({"retrieval": False},
                                                                     LossConfig(retrieval_weight=0.0))):
        _, batch = _batches(fresh_model, corpus, samples, **kinds)
        fresh_model.zero_grad()
        terms, _ = _terms(fresh_model, batch, cfg)
        terms["loss"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fresh_model.parameters())


def test_both_weights_zero_is_refused():
    with pytest.raises(OneGenError, match="not both 0"):
        LossConfig(lm_weight=0.0, retrieval_weight=0.0)


def test_query_token_weight_scales_only_the_query_targets(tiny_model, corpus, samples):
    rendered = [r for r in (tiny_model.renderer.render(s) for s in samples[:6]) if r is not None]
    make = lambda **kw: Collator(corpus, tiny_model.renderer.encode_document, tiny_model.ids.pad, 2, True, **kw)  # noqa: E731
    plain = make(query_id=tiny_model.ids.query)(rendered, random.Random(0))
    weighted = make(query_id=tiny_model.ids.query, query_weight=5.0)(rendered, random.Random(0))
    assert "lm_weights" not in plain  # weight 1: nothing changes
    is_query = weighted["lm_targets"] == tiny_model.ids.query
    assert is_query.any() and torch.equal(weighted["lm_weights"], torch.where(is_query, 5.0, 1.0))
    with torch.no_grad():
        out = tiny_model(weighted)
        per_token = torch.nn.functional.cross_entropy(tiny_model.logits(out["gen_hidden"]).float(),
                                                      out["lm_targets"], reduction="none")
        from onegen.losses import lm_cross_entropy

        expected = (per_token * weighted["lm_weights"]).sum()
        torch.testing.assert_close(lm_cross_entropy(out["gen_hidden"], out["lm_targets"], tiny_model.logits,
                                                    chunk_size=7, weights=weighted["lm_weights"]), expected)
        torch.testing.assert_close(lm_cross_entropy(tiny_model.logits(out["gen_hidden"]), out["lm_targets"],
                                                    weights=weighted["lm_weights"]), expected)
