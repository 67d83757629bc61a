"""
The uncompiled training loss (gpt.SoftcapCrossEntropy): the same losses and gradients as F.cross_entropy on the
softcapped logits, while keeping only one (rows, vocab) tensor for backward instead of three.
"""

import torch
import torch.nn.functional as F

import nanochat.gpt as gpt
from nanochat.gpt import GPT, GPTConfig, SoftcapCrossEntropy, SOFTCAP

def test_matches_plain_softcap_cross_entropy(monkeypatch):
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 1000)  # several chunks, the last one partial
    torch.manual_seed(0)
    padded = (20 * torch.randn(37, 72, dtype=torch.float64)).requires_grad_()
    logits = padded[:, :70]  # the model slices the padded vocab away: a non-contiguous view
    targets = torch.randint(0, 70, (37,))
    targets[::5] = -1
    weights = torch.randn(37, dtype=torch.float64)  # any upstream gradient, not just a mean
    expected = F.cross_entropy(SOFTCAP * torch.tanh(logits / SOFTCAP), targets, ignore_index=-1, reduction="none")
    (expected * weights).sum().backward()
    expected_grad, padded.grad = padded.grad.clone(), None
    losses = SoftcapCrossEntropy.apply(logits, targets)
    (losses * weights).sum().backward()
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded.grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert (losses[::5] == 0).all() and (padded.grad[::5] == 0).all() and (padded.grad[:, 70:] == 0).all()

def test_model_loss_keeps_one_logits_sized_tensor():
    """Every tensor autograd saves during a training forward, by size: the (B*T, vocab) ones are the loss's."""
    config = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    x = torch.randint(0, 512, (2, 32))
    saved = {}
    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, x)
    logits_bytes = 2 * 32 * 512 * 4
    assert sum(nbytes >= logits_bytes for nbytes in saved.values()) == 1, sorted(saved.values())
    loss.backward()  # and the saved tensors are enough for backward
    assert model.lm_head.weight.grad.abs().max() > 0
