"""Streaming inference: BSBRCache, prefill + decoding, BSBRForCausalLM (issue 4).

The contract: for any split of a sequence into a prefill and later calls (one or more tokens),
the hidden states equal the single parallel forward (SPEC §4 tolerance), on CPU and CUDA, with
overlap, compression, batch > 1 and left padding; a batched left-padded generate gives each row
the tokens it gets alone.
"""

import pytest
import torch

import bsbr_ext
from bsbr_ext import BSBRCache, BSBRForCausalLM, BSBRModel, modules

VOCAB = 61
CONFIGS = [  # (chunk_size, chunk_overlap, compression_factor)
    (8, 0, None),
    (8, 3, 2),
    (8, 8, None),
    (5, 2, 4),
]


def make_model(size, overlap, factor, dtype=torch.float64, device="cpu", hidden=32, heads=4):
    torch.manual_seed(0)
    model = BSBRModel(VOCAB, hidden, 2, heads, size, 48, dropout=0.0, compression_factor=factor,
                      chunk_overlap=overlap)
    return model.to(device, dtype).eval()


def stream(model, ids, splits):
    """Hidden states of ids fed as a prefill of splits[0] tokens, then calls of the given sizes."""
    hidden, cache = model(ids[:, : splits[0]], use_cache=True)
    outs, start = [hidden], splits[0]
    for size in splits[1:]:
        hidden, cache = model(ids[:, start : start + size], cache=cache)
        outs.append(hidden)
        start += size
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1), cache


def left_padded(lengths, extra=0, device="cpu"):
    """Random sequences of ``length + extra`` tokens; returns them, the left-padded batch of their
    first ``length`` tokens with its mask, and the ``extra`` tokens that follow (``[b, extra]``)."""
    n = max(lengths)
    seqs = [torch.randint(0, VOCAB, (length + extra,), device=device) for length in lengths]
    ids = torch.zeros(len(seqs), n, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, length in enumerate(lengths):
        ids[r, n - length :] = seqs[r][:length]
        mask[r, n - length :] = 1
    new = torch.stack([s[length:] for s, length in zip(seqs, lengths)])
    return seqs, ids, mask, new


@pytest.mark.parametrize("size,overlap,factor", CONFIGS)
@pytest.mark.parametrize("prefill", [1, 4, 8, 9, 16, 23])
def test_prefill_then_tokens_equals_parallel(size, overlap, factor, prefill):
    model = make_model(size, overlap, factor)
    n = 37
    ids = torch.randint(0, VOCAB, (3, n))
    rest = n - prefill
    # Calls of 1, 2 and 3 tokens, so calls start and end on and off chunk boundaries.
    splits = [prefill] + [s for s in [1, 2, 3] * n][: rest]
    while sum(splits) > n:
        splits[-1] -= sum(splits) - n
        if splits[-1] <= 0:
            splits.pop()
    with torch.no_grad():
        got, cache = stream(model, ids, splits)
        full = model(ids)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)
    assert cache.host_lengths == [n] * 3
    assert cache.lengths.tolist() == [n] * 3


@pytest.mark.parametrize("size,overlap,factor", CONFIGS)
def test_left_padded_prefill_and_decode_equal_alone(size, overlap, factor):
    model = make_model(size, overlap, factor)
    lengths, extra = [13, 7, 16, 1], 11
    n = max(lengths)
    seqs, ids, mask, new = left_padded(lengths, extra)
    with torch.no_grad():
        hidden, cache = model(ids, attention_mask=mask, use_cache=True)
        steps = torch.cat([model(new[:, i : i + 1], cache=cache)[0] for i in range(extra)], dim=1)
        for r, length in enumerate(lengths):
            alone = model(seqs[r][None])[0]
            torch.testing.assert_close(hidden[r, n - length :], alone[:length], rtol=1e-10, atol=1e-10)
            assert torch.all(hidden[r, : n - length] == 0)
            torch.testing.assert_close(steps[r], alone[length:], rtol=1e-10, atol=1e-10)
    assert cache.host_lengths == [length + extra for length in lengths]


def test_cache_layout_and_reserve():
    size, overlap = 8, 3
    model = make_model(size, overlap, 2)
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        _, cache = model(ids, use_cache=True)
    assert isinstance(cache, BSBRCache) and len(cache.layers) == 2
    layer = cache.layers[0]
    assert layer.window_k.shape == (2, 4, overlap + size, 8)
    assert layer.states.shape[3:] == (4, 8) and layer.states.dtype == torch.float64
    assert layer.retrieved.shape == (2, 4, 4, 8)
    # Window: the overlap (tokens 21..23) then the current chunk's tokens 24..28.
    attn = model.layers[0].attention
    with torch.no_grad():
        x = model.layers[0].norm1(model.embed(ids, torch.arange(29)))
        _, k, _ = attn.project_qkv(x)
    torch.testing.assert_close(layer.window_k[:, :, : overlap + 5], k[:, :, 21:29])
    cache.reserve(1000)
    assert layer.capacity() == 1000 // size
    ptr = layer.states.data_ptr()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randint(0, VOCAB, (2, 1)), cache=cache)
    assert layer.states.data_ptr() == ptr  # reserved: no reallocation while decoding
    assert cache.nbytes() == sum(
        t.numel() * t.element_size() for lc in cache.layers for t in lc.tensors()
    )


def test_decode_step_runs_in_the_kernels(monkeypatch):
    """One decode_attention call per layer per token; decode_retrieval and chunk_states only on
    steps that complete a chunk (no Python loop over chunks, heads or cached tokens)."""
    size = 4
    model = make_model(size, 1, None)
    calls = {"decode_attention": 0, "decode_retrieval": 0, "chunk_states": 0}
    for name in calls:
        original = getattr(modules, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(modules, name, counting)
    with torch.no_grad():
        _, cache = model(torch.randint(0, VOCAB, (1, 6)), use_cache=True)
        for name in calls:
            calls[name] = 0
        model(torch.randint(0, VOCAB, (1, 1)), cache=cache)  # token 6: chunk goes on
        assert calls == {"decode_attention": 2, "decode_retrieval": 0, "chunk_states": 0}
        model(torch.randint(0, VOCAB, (1, 1)), cache=cache)  # token 7 completes chunk 1
        assert calls == {"decode_attention": 4, "decode_retrieval": 2, "chunk_states": 2}


def test_cached_forward_validation():
    model = make_model(8, 0, None)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        _, cache = model(ids, use_cache=True)
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids[:, :1], attention_mask=torch.ones(2, 1), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            model(ids[:1, :1], cache=cache)
        with pytest.raises(ValueError, match="at least one token"):
            model(ids, attention_mask=torch.tensor([[1] * 5, [0] * 5]), use_cache=True)
        with pytest.raises(ValueError, match="cache does not fit"):
            make_model(4, 0, None)(ids[:, :1], cache=cache)


def test_prefill_with_cache_trains():
    """The prefill path stays differentiable (the cache itself holds detached tensors)."""
    model = make_model(8, 2, None).train()
    ids = torch.randint(0, VOCAB, (2, 19))
    hidden, cache = model(ids, use_cache=True)
    hidden.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(t.requires_grad for lc in cache.layers for t in lc.tensors())


def test_decode_gradient_raises():
    model = make_model(8, 0, None)
    _, cache = model(torch.randint(0, VOCAB, (1, 3)), use_cache=True)
    hidden, _ = model(torch.randint(0, VOCAB, (1, 1)), cache=cache)
    with pytest.raises(RuntimeError, match="not implemented"):
        hidden.sum().backward()


# ----------------------------------------------------------------------------------------------
# causal LM


def make_lm(size=8, overlap=3, factor=2, dtype=torch.float64, device="cpu", hidden=32, heads=4):
    torch.manual_seed(0)
    lm = BSBRForCausalLM(VOCAB, hidden, 2, heads, size, 48, dropout=0.0, compression_factor=factor,
                         chunk_overlap=overlap)
    with torch.no_grad():  # away from the random init's fixed points, so greedy paths vary
        for p in lm.parameters():
            p.normal_(0, 0.5)
    return lm.to(device, dtype).eval()


def naive_greedy(lm, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, lm(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_lm_loss_is_next_token_cross_entropy():
    lm = make_lm()
    ids = torch.randint(0, VOCAB, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = lm(ids, labels=ids, attention_mask=mask)
    logits = lm.logits(lm.model(ids, mask))
    torch.testing.assert_close(out.logits, logits)
    labels = ids.masked_fill(mask == 0, -100)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert lm.model.embedding.weight.grad is not None
    assert out.cache is None


@pytest.mark.parametrize("size,overlap,factor", [(8, 3, 2), (4, 0, None)])
def test_generate_greedy_matches_full_forward_and_batch(size, overlap, factor):
    lm = make_lm(size, overlap, factor)
    lengths, steps = [13, 6, 16], 14
    n = max(lengths)
    seqs, ids, mask, _ = left_padded(lengths)
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=steps, top_k=1)
    assert batched.shape == (3, n + steps)
    assert torch.equal(batched[:, :n], ids)
    for r, seq in enumerate(seqs):
        alone = lm.generate(seq[None], max_new_tokens=steps, top_k=1)
        assert torch.equal(batched[r, n:], alone[0, len(seq) :])
        assert torch.equal(alone, naive_greedy(lm, seq[None], steps))


def test_generate_sampling_and_eos():
    lm = make_lm()
    ids = torch.randint(0, VOCAB, (2, 9))
    a = lm.generate(ids, max_new_tokens=6, top_k=5, temperature=0.7,
                    generator=torch.Generator().manual_seed(3))
    b = lm.generate(ids, max_new_tokens=6, top_k=5, temperature=0.7,
                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 15)
    # With top_k=5 every sampled token is among the 5 most likely at its step.
    logits = lm(a).logits
    for t in range(9, 15):
        top = logits[:, t - 1].topk(5).indices
        assert (top == a[:, t : t + 1]).any(dim=1).all()
    greedy = lm.generate(ids, max_new_tokens=6, top_k=1)
    eos = int(greedy[0, 10])  # row 0's second new token
    out = lm.generate(ids, max_new_tokens=6, top_k=1, eos_token_id=eos)
    assert torch.all(out[0, 10:] == eos)
    first = (greedy[1, 9:] == eos).nonzero()
    if len(first) == 0:  # row 1 never emits it: it runs all 6 steps unchanged
        assert torch.equal(out[1], greedy[1])


def test_generate_validation():
    lm = make_lm()
    ids = torch.randint(0, VOCAB, (1, 4))
    for kwargs, word in [({"max_new_tokens": -1}, "max_new_tokens"), ({"top_k": 0}, "top_k"),
                         ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=word):
            lm.generate(ids, **kwargs)


def test_exports():
    for name in ["BSBRCache", "BSBRLayerCache", "BSBRForCausalLM", "CausalLMOutput"]:
        assert name in bsbr_ext.__all__ and hasattr(bsbr_ext, name)


# ----------------------------------------------------------------------------------------------
# Head dim 64: compiled in every CUDA build (BSBR_HEAD_DIMS may leave out the others).
CUDA_SIZE = dict(hidden=128, heads=2)

# CUDA: streaming on the GPU kernels against the fp64 truth (SPEC §4 tolerance, with the
# parallel forward in the same dtype as the yardstick)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size,overlap,factor", [(16, 0, None), (16, 5, 2), (32, 32, 4)])
def test_cuda_streaming_matches_parallel(dtype, size, overlap, factor):
    lengths, extra = [40, 23], 37
    truth_model = make_model(size, overlap, factor, **CUDA_SIZE)  # fp64 CPU
    model = make_model(size, overlap, factor, dtype=dtype, device="cuda", **CUDA_SIZE)
    seqs, ids, mask, new = left_padded(lengths, extra)
    with torch.no_grad():
        _, cache = model(ids.cuda(), attention_mask=mask.cuda(), use_cache=True)
        steps = torch.cat([model(new[:, i : i + 1].cuda(), cache=cache)[0] for i in range(extra)], 1)
        for r, length in enumerate(lengths):
            seq = seqs[r][None]
            truth = truth_model(seq)[0, length:]
            parallel = model(seq.cuda())[0, length:]
            err = (steps[r].double().cpu() - truth).abs().max().item()
            ref_err = (parallel.double().cpu() - truth).abs().max().item()
            floor = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype] * truth.abs().max().item()
            assert err <= 2 * ref_err + floor, (err, ref_err, floor)


def test_cuda_graph_decoder_needs_cuda():
    model = make_model(8, 0, None)
    with torch.no_grad():
        _, cache = model(torch.randint(0, VOCAB, (1, 3)), use_cache=True)
    with pytest.raises(ValueError, match="CUDA"):
        bsbr_ext.CUDAGraphDecoder(model, cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("size,overlap,factor", [(16, 0, None), (16, 5, 2)])
def test_cuda_graph_decoder_matches_eager(size, overlap, factor):
    model = make_model(size, overlap, factor, dtype=torch.float32, device="cuda", **CUDA_SIZE)
    lengths, steps = [21, 9], 3 * size + 3  # several chunk completions in both rows
    _, ids, mask, new = left_padded(lengths, steps, device="cuda")
    with torch.no_grad():
        _, eager_cache = model(ids, attention_mask=mask, use_cache=True)
        _, graph_cache = model(ids, attention_mask=mask, use_cache=True)
        decoder = bsbr_ext.CUDAGraphDecoder(model, graph_cache)
        for i in range(steps):
            expected, _ = model(new[:, i : i + 1], cache=eager_cache)
            got = decoder(new[:, i : i + 1])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(decoder.steps) == {False, True}  # both kinds of step were captured and replayed
    assert graph_cache.host_lengths == eager_cache.host_lengths
    assert torch.equal(graph_cache.lengths, eager_cache.lengths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_generate_batched_equals_alone():
    lm = make_lm(16, 5, 2, dtype=torch.float32, device="cuda", **CUDA_SIZE)
    lengths, steps = [30, 11, 17], 40
    n = max(lengths)
    seqs, ids, mask, _ = left_padded(lengths, device="cuda")
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=steps, top_k=1)
    eager = lm.generate(ids, attention_mask=mask, max_new_tokens=steps, top_k=1, cuda_graph=False)
    assert torch.equal(batched, eager)
    for r, seq in enumerate(seqs):
        alone = lm.generate(seq[None], max_new_tokens=steps, top_k=1)
        assert torch.equal(batched[r, n:], alone[0, len(seq) :])
