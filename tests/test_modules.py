"""The module layer (SPEC §2): BSBRAttention, BSBRLayer, BSBRModel.

Correctness only, small shapes, fast on 2 CPU cores. The modules are checked against an independent
fp64 computation built from their own weights and `reference.bsbr_attention_dense`.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import bsbr_ext
from bsbr_ext import BSBRAttention, BSBRLayer, BSBRModel, modules, reference



# ----------------------------------------------------------------------------------------------
# independent computation of SPEC §2 (fp64, loops, the dense form of §1)


def split(t, h):
    b, n, e = t.shape
    return t.reshape(b, n, h, e // h).permute(0, 2, 1, 3)


def independent_attention(attn, x):
    """BSBRAttention.forward(x) (no mask, no dropout) from its weights, written out plainly."""
    h, size, w = attn.num_heads, attn.chunk_size, attn.chunk_overlap
    b, n, hidden = x.shape
    wq, wk, wv = attn.qkv.weight.split(hidden, 0)
    bq, bk, bv = attn.qkv.bias.split(hidden, 0)
    q, k, v = (split(x @ wt.T + bt, h) for wt, bt in ((wq, bq), (wk, bk), (wv, bv)))
    chunks = math.ceil(n / size)
    xbar = torch.stack([x[:, c * size : (c + 1) * size].mean(1) for c in range(chunks)], 1)
    meta_k = split(xbar @ attn.meta_key.weight.T, h)
    prev = torch.cat([torch.zeros_like(xbar[:, :1]), xbar[:, :-1]], 1)  # meta_q[0] unused
    meta_q = split(prev @ attn.meta_query.weight.T, h)
    q_state = k_state = None
    if attn.state_proj is not None:
        p = attn.state_proj.weight.T  # d x d/f
        assert p.shape == (hidden // h, hidden // h // attn.compression_factor)
        q_state, k_state = q @ p, k @ p
    o = reference.bsbr_attention_dense(
        q, k, v, meta_q, meta_k, size, w, q_state=q_state, k_state=k_state
    )
    o = o.permute(0, 2, 1, 3).reshape(b, n, hidden)
    return o @ attn.out_proj.weight.T + attn.out_proj.bias


def independent_model(model, ids):
    """BSBRModel.forward(ids) (no mask, eval) from its weights."""
    n, hidden = ids.shape[1], model.hidden_dim
    t = torch.arange(n, dtype=torch.float64).view(n, 1)
    half = (hidden + 1) // 2
    i = torch.arange(half, dtype=torch.float64).view(1, half)
    angle = t * torch.exp(-math.log(10000.0) * i / half)
    pe = torch.stack([angle.sin(), angle.cos()], -1).reshape(n, 2 * half)[:, :hidden]
    x = model.embedding.weight[ids] * math.sqrt(hidden) + pe
    for layer in model.layers:
        x = x + independent_attention(layer.attention, layer.norm1(x))
        lin1, lin2 = layer.ff[0], layer.ff[3]
        x = x + lin2(F.gelu(lin1(layer.norm2(x))))
    return model.norm(x)


CONFIGS = [  # chunk_size, chunk_overlap, compression_factor
    (8, 0, None),
    (8, 3, 2),
    (5, 5, 1),
    (16, 4, 4),
]


@pytest.mark.parametrize("size,overlap,factor", CONFIGS)
@pytest.mark.parametrize("n", [1, 7, 37])
def test_attention_matches_independent(size, overlap, factor, n):
    torch.manual_seed(0)
    attn = BSBRAttention(32, 2, size, compression_factor=factor, chunk_overlap=overlap).double()
    with torch.no_grad():  # make the retrieval logits non-trivial
        attn.meta_query.weight.mul_(4.0)
        attn.meta_key.weight.mul_(4.0)
    x = torch.randn(3, n, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), independent_attention(attn, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("size,overlap,factor", [(8, 0, None), (8, 3, 2)])
def test_model_matches_independent(size, overlap, factor):
    torch.manual_seed(1)
    model = BSBRModel(50, 32, 2, 4, size, 48, 0.1, factor, overlap).double().eval()
    ids = torch.randint(0, 50, (2, 29))
    torch.testing.assert_close(model(ids), independent_model(model, ids), rtol=1e-9, atol=1e-10)


def test_meta_queries_come_from_previous_chunk():
    torch.manual_seed(2)
    attn = BSBRAttention(16, 2, 4).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    xbar = attn.chunk_summaries(x)
    assert xbar.shape == (1, 3, 16)
    torch.testing.assert_close(xbar[:, 2], x[:, 8:].mean(1))  # partial last chunk: its tokens
    mq, mk = attn.meta_queries(xbar), attn.meta_keys(xbar)
    assert mq.shape == mk.shape == (1, 2, 3, 8)
    assert torch.equal(mq[:, :, 0], torch.zeros_like(mq[:, :, 0]))
    torch.testing.assert_close(mq[:, :, 2], attn.meta_queries_from(xbar[:, 1:2])[:, :, 0])
    # masked summaries: a chunk without real tokens is 0
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    xbar = attn.chunk_summaries(x, mask)
    torch.testing.assert_close(xbar[:, 0], x[:, :2].mean(1))
    assert torch.equal(xbar[:, 1], torch.zeros_like(xbar[:, 1]))
    torch.testing.assert_close(xbar[:, 2], x[:, 8])


# ----------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("size,overlap,factor", [(8, 0, None), (8, 3, 2), (8, 8, 4)])
def test_attention_causal(size, overlap, factor):
    torch.manual_seed(3)
    attn = BSBRAttention(32, 2, size, compression_factor=factor, chunk_overlap=overlap).eval()
    x = torch.randn(2, 37, 32)
    base = attn(x)
    for t in (3, 8, 15, 16, 29, 36):
        y = x.clone()
        y[:, t] += torch.randn(2, 32) * 3.0
        out = attn(y)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.equal(out[:, t], base[:, t]), t


@pytest.mark.parametrize("size,overlap,factor", [(8, 0, None), (8, 3, 2)])
def test_model_causal(size, overlap, factor):
    torch.manual_seed(4)
    model = BSBRModel(50, 32, 2, 2, size, 64, 0.0, factor, overlap).eval()
    ids = torch.randint(0, 50, (2, 41))
    base = model(ids)
    for t in (5, 8, 17, 24, 40):
        perturbed = ids.clone()
        perturbed[:, t] = (perturbed[:, t] + 1) % 50
        out = model(perturbed)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.equal(out[:, t], base[:, t]), t


# ----------------------------------------------------------------------------------------------
# attention_mask: a padded batch gives every sequence what it gets alone; padding outputs are 0


LENGTHS = [23, 9, 17, 1]  # full row, n < chunk, odd, single token
N_PAD = 23


def padded_batch(seqs, side, mask_dtype):
    rows, masks = [], []
    for s in seqs:
        pad = N_PAD - s.shape[0]
        filler = torch.randn((pad,) + tuple(s.shape[1:])) * 100 if s.is_floating_point() else (
            torch.full((pad,), 3, dtype=s.dtype)
        )
        m = torch.cat([torch.ones(s.shape[0]), torch.zeros(pad)]).to(mask_dtype)
        if side == "left":
            rows.append(torch.cat([filler.to(s.dtype), s]))
            masks.append(m.flip(0))
        else:
            rows.append(torch.cat([s, filler.to(s.dtype)]))
            masks.append(m)
    return torch.stack(rows), torch.stack(masks)


def real_slice(side, length):
    return slice(N_PAD - length, N_PAD) if side == "left" else slice(0, length)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("size,overlap,factor", [(8, 0, None), (4, 2, 2)])
def test_attention_mask_equals_alone(side, size, overlap, factor):
    torch.manual_seed(5)
    attn = BSBRAttention(32, 2, size, compression_factor=factor, chunk_overlap=overlap).double()
    seqs = [torch.randn(n, 32, dtype=torch.float64) for n in LENGTHS]
    x, mask = padded_batch(seqs, side, torch.long)
    out = attn(x, mask)
    for i, s in enumerate(seqs):
        real = real_slice(side, s.shape[0])
        alone = attn(s.unsqueeze(0))[0]
        torch.testing.assert_close(out[i, real], alone, rtol=1e-9, atol=1e-10)
        padding = mask[i] == 0
        assert torch.equal(out[i][padding], torch.zeros_like(out[i][padding]))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_model_mask_equals_alone(side, mask_dtype):
    torch.manual_seed(6)
    model = BSBRModel(50, 32, 2, 2, 4, 64, 0.1, 2, 2).double().eval()
    seqs = [torch.randint(0, 50, (n,)) for n in LENGTHS]
    ids, mask = padded_batch(seqs, side, mask_dtype)
    out = model(ids, mask)
    for i, s in enumerate(seqs):
        real = real_slice(side, s.shape[0])
        torch.testing.assert_close(out[i, real], model(s.unsqueeze(0))[0], rtol=1e-9, atol=1e-10)
        padding = mask[i] == 0
        assert torch.equal(out[i][padding], torch.zeros_like(out[i][padding]))


def test_mask_gradients_and_edge_rows():
    """All-ones mask == no mask; an all-padding row gives 0; padding gets no gradient."""
    torch.manual_seed(7)
    attn = BSBRAttention(32, 2, 4, compression_factor=2, chunk_overlap=1).double()
    x = torch.randn(3, 11, 32, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(attn(x, torch.ones(3, 11)), attn(x), rtol=1e-12, atol=1e-12)
    mask = torch.ones(3, 11)
    mask[1] = 0
    mask[2, :6] = 0
    out = attn(x, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert torch.equal(x.grad[2, :6], torch.zeros_like(x.grad[2, :6]))


def test_padding_is_excluded_from_chunk_states(monkeypatch):
    """In the packed layout padding values are 0, so every chunk state sums real tokens only."""
    seen = []
    real = modules.bsbr_attention

    def spy(*args):
        seen.append(args)
        return real(*args)

    monkeypatch.setattr(modules, "bsbr_attention", spy)
    torch.manual_seed(9)
    attn = BSBRAttention(16, 2, 4, compression_factor=2).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    attn(x, mask)
    v, k_state = seen[0][2], seen[0][11]
    for i, n_real in enumerate((7, 5)):
        assert torch.equal(v[i, :, n_real:], torch.zeros_like(v[i, :, n_real:]))
        alone = attn.project_state(attn.project_qkv(x[i : i + 1, mask[i].bool()])[1])
        states = reference.chunk_states(k_state[i : i + 1], v[i : i + 1], 4)
        expect = reference.chunk_states(alone, attn.project_qkv(x[i : i + 1, mask[i].bool()])[2], 4)
        torch.testing.assert_close(states[:, :, : expect.shape[2]], expect)


def test_mask_with_holes_packs_real_tokens():
    """Beyond left/right padding: real tokens are packed in order, as if run alone."""
    torch.manual_seed(8)
    attn = BSBRAttention(16, 2, 3).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 1, 0]])
    keep = mask[0].bool()
    out = attn(x, mask)
    torch.testing.assert_close(out[0, keep], attn(x[:, keep])[0], rtol=1e-9, atol=1e-10)
    assert torch.equal(out[0, ~keep], torch.zeros_like(out[0, ~keep]))


def test_packing_permutation():
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.bool)
    src, dest, packed = modules.packing_permutation(keep)
    assert src.tolist() == [[2, 3, 4, 0, 1], [0, 1, 2, 3, 4], [1, 3, 0, 2, 4]]
    assert packed.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert torch.equal(src.gather(1, dest), torch.arange(5).expand(3, 5))


# ----------------------------------------------------------------------------------------------
# compression and validation


@pytest.mark.parametrize("factor,ds", [(None, 16), (1, 16), (2, 8), (4, 4), (16, 1)])
def test_compression_state_shapes(monkeypatch, factor, ds):
    seen = {}
    real = modules.bsbr_attention

    def spy(q, k, v, meta_q, meta_k, chunk_size, chunk_overlap=0, scale=None, meta_scale=None,
            state_scale=None, q_state=None, k_state=None):
        seen.update(q=q.shape, meta_q=meta_q.shape, meta_k=meta_k.shape,
                    q_state=None if q_state is None else q_state.shape,
                    k_state=None if k_state is None else k_state.shape,
                    states=reference.chunk_states(k if k_state is None else k_state, v,
                                                  chunk_size).shape)
        return real(q, k, v, meta_q, meta_k, chunk_size, chunk_overlap, scale, meta_scale,
                    state_scale, q_state, k_state)

    monkeypatch.setattr(modules, "bsbr_attention", spy)
    attn = BSBRAttention(64, 4, 8, compression_factor=factor)
    out = attn(torch.randn(2, 21, 64))
    assert out.shape == (2, 21, 64)
    assert seen["q"] == (2, 4, 21, 16)
    assert seen["meta_q"] == seen["meta_k"] == (2, 4, 3, 16)
    if factor in (None, 1):
        assert attn.state_proj is None and seen["q_state"] is None and seen["k_state"] is None
    else:
        assert seen["q_state"] == seen["k_state"] == (2, 4, 21, ds)
    assert seen["states"] == (2, 4, 3, ds, 16)  # each chunk state is (d/f) x d


BAD_ATTENTION_ARGS = [
    (dict(hidden_dim=30, num_heads=4, chunk_size=8), "divisible"),
    (dict(hidden_dim=0, num_heads=1, chunk_size=8), "hidden_dim"),
    (dict(hidden_dim=32, num_heads=0, chunk_size=8), "num_heads"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=0), "chunk_size"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=8.0), "chunk_size"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=8, chunk_overlap=-1), "chunk_overlap"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=8, chunk_overlap=9), "chunk_overlap"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=8, compression_factor=3), "compression_factor"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=8, compression_factor=32), "compression_factor"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=8, compression_factor=0), "compression_factor"),
    (dict(hidden_dim=32, num_heads=2, chunk_size=8, dropout=1.5), "dropout"),
]


@pytest.mark.parametrize("kwargs,word", BAD_ATTENTION_ARGS)
def test_attention_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BSBRAttention(**kwargs)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=0), "num_layers"),
        (dict(ff_dim=0), "ff_dim"),
        (dict(num_heads=3), "divisible"),
        (dict(chunk_overlap=9), "chunk_overlap"),
        (dict(compression_factor=5), "compression_factor"),
    ],
)
def test_model_validation(kwargs, word):
    args = dict(vocab_size=10, hidden_dim=32, num_layers=1, num_heads=2, chunk_size=8, ff_dim=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        BSBRModel(**args)


def test_forward_validation():
    attn = BSBRAttention(32, 2, 8)
    with pytest.raises(ValueError, match="hidden_dim"):
        attn(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(5, 32))
    with pytest.raises(ValueError, match="attention_mask"):
        attn(torch.randn(2, 5, 32), torch.ones(2, 6))
    model = BSBRModel(10, 32, 1, 2, 8, 16)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(5))


# ----------------------------------------------------------------------------------------------
# recommended configurations, checkpointing, positions at any length


RECOMMENDED = [  # chunk_size, compression_factor, chunk_overlap, use_checkpointing
    (64, 2, 0, False),
    (128, 4, 0, False),
    (256, 8, 0, True),
    (128, None, 32, False),
]


def count_attention_calls(monkeypatch):
    calls = []
    real = modules.bsbr_attention

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(modules, "bsbr_attention", counting)
    return calls


@pytest.mark.parametrize("size,factor,overlap,ckpt", RECOMMENDED)
def test_recommended_configs_train(monkeypatch, size, factor, overlap, ckpt):
    torch.manual_seed(9)
    model = BSBRModel(100, 64, 2, 2, size, 128, 0.1, factor, overlap, ckpt).train()
    n = max(301, 2 * size + 19)  # odd, >= 3 chunks so that the retrieval has a gradient
    ids = torch.randint(0, 100, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :12] = 0  # left padding
    calls = count_attention_calls(monkeypatch)
    out = model(ids, mask)
    assert out.shape == (2, n, 64) and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert len(calls) == (4 if ckpt else 2)  # checkpointing recomputes each layer once
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "embedding" not in name:
            assert p.grad.abs().sum() > 0, name


def test_checkpointing_same_gradients(monkeypatch):
    torch.manual_seed(10)
    ckpt = BSBRModel(100, 32, 3, 2, 16, 64, 0.1, 2, 4, use_checkpointing=True).double().train()
    plain = copy.deepcopy(ckpt)
    plain.use_checkpointing = False
    ids = torch.randint(0, 100, (2, 45))
    mask = torch.ones(2, 45)
    mask[0, 30:] = 0
    grads = []
    for model in (ckpt, plain):
        calls = count_attention_calls(monkeypatch)
        torch.manual_seed(11)  # same dropout masks
        model(ids, mask).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        assert len(calls) == (6 if model is ckpt else 3)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12)
    # eval mode never checkpoints
    calls = count_attention_calls(monkeypatch)
    ckpt.eval()(ids)
    assert len(calls) == 3


def test_positions_any_length():
    torch.manual_seed(12)
    model = BSBRModel(20, 16, 1, 2, 64, 32, 0.0).eval()
    ids = torch.randint(0, 20, (1, 3000))
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (1, 3000, 16) and torch.isfinite(out).all()


def test_layer_forward():
    torch.manual_seed(13)
    layer = BSBRLayer(32, 2, 8, 64, 0.0, 2, 2).double().eval()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    expect = x + independent_attention(layer.attention, layer.norm1(x))
    expect = expect + layer.ff(layer.norm2(expect))
    torch.testing.assert_close(layer(x), expect, rtol=1e-9, atol=1e-10)
    mask = torch.ones(2, 19)
    mask[0, :4] = 0
    out = layer(x, mask)
    torch.testing.assert_close(out[0, 4:], layer(x[:1, 4:])[0], rtol=1e-9, atol=1e-10)


def test_package_exports():
    assert bsbr_ext.BSBRAttention is BSBRAttention
    assert bsbr_ext.BSBRLayer is BSBRLayer
    assert bsbr_ext.BSBRModel is BSBRModel


# ----------------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")
@pytest.mark.parametrize("factor,overlap", [(None, 0), (2, 3)])
def test_torchscript_round_trip(tmp_path, factor, overlap):
    torch.manual_seed(14)
    model = BSBRModel(50, 32, 2, 2, 8, 64, 0.1, factor, overlap, use_checkpointing=True).eval()
    ids = torch.randint(0, 50, (2, 27))
    mask = torch.ones(2, 27, dtype=torch.long)
    mask[0, :5] = 0
    scripted = torch.jit.script(model)
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for args in ((ids,), (ids, mask)):
            expect = model(*args)
            torch.testing.assert_close(scripted(*args), expect, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(loaded(*args), expect, rtol=1e-6, atol=1e-6)
    attn = torch.jit.script(BSBRAttention(32, 2, 8, compression_factor=2).eval())
    attn.save(str(tmp_path / "attn.pt"))
    x = torch.randn(2, 13, 32)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "attn.pt"))(x), attn(x))


# ----------------------------------------------------------------------------------------------
# CUDA


def cuda_kernels_available():
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("bsbr::_bsbr_attention_fwd", "CUDA")
    except RuntimeError:
        return False


@pytest.mark.skipif(not cuda_kernels_available(), reason="needs a GPU and the bsbr CUDA kernels")
@pytest.mark.parametrize("size,factor,overlap", [(64, 2, 0), (128, None, 32)])
def test_cuda_training_step_matches_cpu(size, factor, overlap):
    torch.manual_seed(15)
    cpu = BSBRModel(100, 128, 2, 2, size, 256, 0.0, factor, overlap).train()
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(0, 100, (2, 333))
    mask = torch.ones(2, 333, dtype=torch.long)
    mask[1, :50] = 0
    target = torch.randn(2, 333, 128)
    results = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = model(ids.to(dev), mask.to(dev))
        loss = (out - target.to(dev)).square().mean()
        loss.backward()
        grads = {k: p.grad.detach().cpu() for k, p in model.named_parameters()}
        opt.step()
        results.append((out.detach().cpu(), loss.item(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-3, atol=2e-3)
    assert abs(results[1][1] - results[0][1]) < 1e-3 * abs(results[0][1])
    for name, g in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], g, rtol=1e-2, atol=1e-4, msg=name)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode:UserWarning")
def test_cuda_mask_handling_does_not_sync():
    """Packing, summaries, meta queries/keys and positions never synchronise with the host."""
    attn = BSBRAttention(32, 2, 8, compression_factor=2).cuda()
    x = torch.randn(3, 29, 32, device="cuda")
    mask = torch.ones(3, 29, device="cuda")
    mask[0, :5] = 0
    mask[1, 20:] = 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        src, dest, packed = modules.packing_permutation(mask != 0)
        xp = modules.gather_tokens(x, src)
        xbar = attn.chunk_summaries(xp, packed)
        attn.meta_queries(xbar), attn.meta_keys(xbar), attn.project_state(xp.view(3, 29, 2, 16))
        modules.gather_tokens(xp, dest)
        modules.sinusoidal_positions(torch.arange(29, device="cuda"), 32, torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_src, _, _ = modules.packing_permutation(mask.cpu() != 0)
    assert torch.equal(src.cpu(), ref_src)
