"""passes/classify_attention.py: each found attention is self- or cross-attention, and a site the
hybrid op cannot take is declined with its ``Decline.code`` and a sentence whose sizes are words
("4 tokens per frame × T frames"), never the export's shape symbols ("s53")."""
import re
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rehyat_compile.declines import CODES
from rehyat_compile.export import export_video_model
from rehyat_compile.passes import pipeline
from rehyat_compile.passes.canonicalize import canonicalize
from rehyat_compile.passes.classify_attention import classify_attention, classify_site
from rehyat_compile.passes.find_attention import find_sites

C, HEADS, D, TEXT = 8, 2, 8, 3
RAW_SYMBOL = re.compile(r"\bs\d+\b")


class Attention(nn.Module):
    """Tokens [B, N, C] -> one SDPA in the given variant -> [B, N, HEADS*D]."""

    def __init__(self, variant):
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        self.to_q, self.to_k, self.to_v = (nn.Linear(C, HEADS * D) for _ in range(3))
        self.text = nn.Parameter(torch.randn(1, TEXT, C))

    @staticmethod
    def heads(x, d=D):
        b, n, _ = x.shape
        return x.reshape(b, n, -1, d).transpose(1, 2)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        q, k, v = (self.heads(f(tokens)) for f in (self.to_q, self.to_k, self.to_v))
        variant = self.variant
        if variant == "self":
            o = F.scaled_dot_product_attention(q, k, v)
        elif variant == "causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif variant == "cross":
            text = self.text.expand(b, -1, -1)
            o = F.scaled_dot_product_attention(q, self.heads(self.to_k(text)), self.heads(self.to_v(text)))
        elif variant == "value-dim-4":
            o = F.scaled_dot_product_attention(q, k, self.heads(self.to_v(tokens)[..., :HEADS * 4], 4))
            o = o.repeat(1, 1, 1, 2)
        elif variant == "value-dim-frames":  # the value head dim is T (n // 4): a symbolic size
            o = F.scaled_dot_product_attention(q, k, torch.ones(b, HEADS, n, n // 4))[..., :1].expand(-1, -1, -1, D)
        elif variant == "query-mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool).tril())
        elif variant == "key-mask":
            keep = torch.ones(b, 1, 1, n, dtype=torch.bool)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        elif variant == "key-mask-2d":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(1, n))
        elif variant == "gqa":
            o = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        elif variant == "dropout":
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        else:
            raise ValueError(variant)
        return o.transpose(1, 2).reshape(b, n, HEADS * D)


class Video(nn.Module):
    """[B, C, T, 2, 2] -> frame-major tokens -> ``attn``; or the two attentions that are not over
    the video: per frame (frames in the batch) and over text tokens alone."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.attn = Attention("self" if variant in ("factorised", "text-only") else variant)

    def forward(self, x):
        b, c, t, h, w = x.shape
        if self.variant == "factorised":
            per_frame = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
            return self.attn(per_frame).reshape(b, t * h * w, HEADS * D)
        if self.variant == "text-only":
            text = self.attn(self.attn.text)
            return x.flatten(2).transpose(1, 2) + text.mean(1, keepdim=True)[..., :C]
        return self.attn(x.flatten(2).transpose(1, 2))


@lru_cache(maxsize=None)
def found(variant, frames=3):
    """(sites of the find pass, frame symbol) of ``Video(variant)`` exported with T symbolic."""
    x = torch.randn(1, C, frames, 2, 2, generator=torch.Generator().manual_seed(0))
    ep, frame_axis = export_video_model(Video(variant).eval(), (x,))
    assert frame_axis.dynamic
    gm = canonicalize(ep.module())
    sites = find_sites(gm)
    assert len(sites) == 1 and sites[0].match.found, sites
    return sites[0], frame_axis.symbol


def classified(variant, patch=1):
    site, symbol = found(variant)
    return classify_site(site, symbol, patch)


def assert_words_not_symbols(detail, symbol):
    assert not RAW_SYMBOL.search(detail), detail
    assert str(symbol) not in detail, detail


# ---------------------------------------------------------------------------------------------
# classify_attention: the kind, and declines that depend on where the sequence comes from
# ---------------------------------------------------------------------------------------------

def test_video_self_attention_is_self_and_not_declined():
    site, symbol = found("self")
    assert classify_attention(site.match, symbol) == ("self", None)
    out = classify_site(site, symbol)
    assert (out.kind, out.decline, out.heads, out.kv_heads, out.head_dim) == ("self", None, 2, 2, 8)
    assert out.name == site.name and out.match is site.match


def test_cross_attention_to_text_is_declined_with_both_lengths_in_words():
    site, symbol = found("cross")
    kind, decline = classify_attention(site.match, symbol)
    assert kind == "cross" and decline.code == "cross-attention"
    assert "4 tokens per frame × T frames of queries" in decline.detail
    assert f"{TEXT} tokens of keys" in decline.detail
    assert_words_not_symbols(decline.detail, symbol)
    out = classify_site(site, symbol)
    assert out.kind == "cross" and out.code == "cross-attention" and not out.rewritable


def test_sizes_in_the_detail_are_counted_in_token_frames_of_the_temporal_patch():
    site, symbol = found("cross")
    _, decline = classify_attention(site.match, symbol, patch=2)
    assert "8 tokens per frame × T frames of queries" in decline.detail  # 4 per input frame, 2 input frames
    assert_words_not_symbols(decline.detail, symbol)


def test_causal_sdpa_over_all_tokens_is_declined_already_causal():
    site, symbol = found("causal")
    kind, decline = classify_attention(site.match, symbol)
    assert kind == "self" and decline.code == "already-causal" and "is_causal=True" in decline.detail


def test_attention_with_frames_in_the_batch_is_declined_factorised():
    site, symbol = found("factorised")
    kind, decline = classify_attention(site.match, symbol)
    assert kind == "self" and decline.code == "factorised"
    assert "(4 tokens)" in decline.detail and "frames sit in the batch" in decline.detail
    assert_words_not_symbols(decline.detail, symbol)


def test_attention_over_a_fixed_length_sequence_is_declined_not_over_video():
    site, symbol = found("text-only")
    kind, decline = classify_attention(site.match, symbol)
    assert kind == "self" and decline.code == "not-over-video"
    assert f"sequence length {TEXT} tokens does not grow with the frames" in decline.detail


def test_without_a_frame_symbol_a_self_attention_is_not_judged_over_video():
    """Static export: whether N grows with the frames is the layout pass's question, not this one."""
    site, _ = found("text-only")
    assert classify_attention(site.match, None) == ("self", None)


# ---------------------------------------------------------------------------------------------
# classify_site: what the hybrid op cannot take
# ---------------------------------------------------------------------------------------------

def test_value_head_dim_unlike_the_query_head_dim_is_declined_head_dims():
    out = classified("value-dim-4")
    assert out.code == "head-dims" and out.kind == "self"
    assert out.reason == "value head dim 4 differs from q/k head dim 8"


def test_symbolic_value_head_dim_is_declined_with_its_size_in_words():
    site, symbol = found("value-dim-frames")
    out = classify_site(site, symbol)
    assert out.code == "head-dims"
    assert_words_not_symbols(out.reason, symbol)


def test_head_dim_that_is_not_a_fixed_number_is_declined_head_dims():
    site, symbol = found("self")
    out = classify_site(replace(site, head_dim=None), symbol)
    assert out.code == "head-dims" and out.reason == "head dim is not a fixed number"


def test_grouped_query_heads_that_divide_are_kept():
    out = classified("gqa")
    assert (out.heads, out.kv_heads, out.decline) == (2, 1, None)


@pytest.mark.parametrize("heads, kv_heads, ok", [(4, 2, True), (6, 3, True), (4, 3, False), (3, 2, False)])
def test_query_heads_not_a_multiple_of_kv_heads_are_declined_grouped_heads(heads, kv_heads, ok):
    site, symbol = found("gqa")
    out = classify_site(replace(site, heads=heads, kv_heads=kv_heads), symbol)
    if ok:
        assert out.decline is None
    else:
        assert out.code == "grouped-heads"
        assert out.reason == f"{heads} query heads are not a multiple of {kv_heads} key/value heads"


def test_mask_that_varies_per_query_is_declined_query_dependent_mask():
    out = classified("query-mask")
    assert out.code == "query-dependent-mask" and "only key masks" in out.reason


@pytest.mark.parametrize("variant", ["key-mask", "key-mask-2d"])
def test_key_masks_broadcast_over_queries_are_kept(variant):
    out = classified(variant)
    assert out.decline is None and out.match.mask is not None


def test_a_declined_kind_stops_the_site_checks():
    """A cross-attention with a query-dependent problem is reported as cross-attention, once."""
    site, symbol = found("cross")
    out = classify_site(replace(site, head_dim=None), symbol)
    assert out.code == "cross-attention"


@pytest.mark.parametrize("variant", ["cross", "causal", "factorised", "text-only", "value-dim-4", "query-mask"])
def test_every_decline_has_a_documented_code_and_a_detail_in_words(variant):
    site, symbol = found(variant)
    out = classify_site(site, symbol)
    assert out.code in CODES and out.reason and not out.rewritable
    assert_words_not_symbols(out.reason, symbol)


# ---------------------------------------------------------------------------------------------
# the classify pass in the pipeline
# ---------------------------------------------------------------------------------------------

def test_classify_pass_leaves_sites_the_find_pass_declined_as_they_were():
    x = torch.randn(1, C, 3, 2, 2)
    ep, frame_axis = export_video_model(Video("dropout").eval(), (x,))
    ctx = pipeline.PassContext(frame_axis)
    after_find = pipeline.run((pipeline.CANONICALIZE, pipeline.FIND), ep.module(), ctx)
    [declined] = after_find.sites
    assert declined.code == "attention-dropout"
    after_classify = pipeline.run(pipeline.CLASSIFY, after_find, ctx)
    assert after_classify.sites == after_find.sites
    assert after_classify.declines == [(declined.name, declined.decline)]
    # classify_site alone would not know about the dropout: the pass must skip the site
    assert classify_site(declined, frame_axis.symbol).decline is None


class SelfAndCross(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = Attention("self"), Attention("cross")

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return self.attn1(tokens) + self.attn2(tokens)


def test_classify_pass_gives_every_open_site_its_kind_in_graph_order():
    ep, frame_axis = export_video_model(SelfAndCross().eval(), (torch.randn(1, C, 3, 2, 2),))
    ctx = pipeline.PassContext(frame_axis)
    after_find = pipeline.run((pipeline.CANONICALIZE, pipeline.FIND), ep.module(), ctx)
    assert [(s.name, s.kind, s.code) for s in after_find.sites] == [("attn1", "self", None), ("attn2", "self", None)]
    result = pipeline.run(pipeline.CLASSIFY, after_find, ctx)
    assert [(s.name, s.kind, s.code) for s in result.sites] == [("attn1", "self", None),
                                                                ("attn2", "cross", "cross-attention")]
    assert [name for name, _ in result.declines] == ["attn2"]
