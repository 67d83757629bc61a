"""
FP8 training for linear layers: tensorwise dynamic scaling, a small stand-in for torchao's
Float8Linear.

    from nanochat.fp8 import convert_to_float8_training, worth_fp8
    convert_to_float8_training(model, module_filter_fn=worth_fp8)
    model = torch.compile(model)   # compile after converting: uncompiled fp8 is slower than bf16

Each matmul quantizes its operands on the fly, one scale per tensor: scale = FP8_MAX / max|x| (in
float64, so tiny amaxes do not overflow), saturate to +-FP8_MAX, cast. Forward: input and weight in
e4m3 (+-448, more mantissa), torch._scaled_mm with fast accumulation, output in the input's dtype.
Backward: the incoming gradient in e5m2 (+-57344, more range), grad_input and grad_weight through
_scaled_mm without fast accumulation. Only the fp8 copies are saved for backward (less activation
memory). Needs CUDA compute capability >= 8.9 (Ada, Hopper). Left out: rowwise/delayed scaling,
biases, fp8 all-gather, fp8 for embeddings.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from nanochat.gpt import Linear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_EPS = 1e-12

def to_fp8(x, fp8_dtype):
    """(x_fp8, inverse_scale): x ~= x_fp8.float() * inverse_scale, the float32 scale computed in
    float64 so that max|x| * scale == the format's largest finite value; values saturate instead of
    overflowing to inf/NaN."""
    fp8_max = torch.finfo(fp8_dtype).max
    scale = (fp8_max / x.detach().abs().max().double().clamp(min=AMAX_EPS)).float()
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype).contiguous()
    return x_fp8, scale.reciprocal()

def scaled_mm(a, a_inv, b, b_inv, out_dtype, fast_accum):
    """a @ b for fp8 operands; the CUDA kernel wants a row-major
    and b column-major (checked here on every device)."""
    assert a.stride(1) == 1 and b.stride(0) == 1, f"_scaled_mm layouts: a strides {a.stride()} " \
        f"(row-major), b strides {b.stride()} (column-major)"
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)

def column_major(x):
    return x.t().contiguous().t()

@torch._dynamo.allow_in_graph
class Float8Matmul(torch.autograd.Function):
    """y = x @ w.T with x (M, K) in the activation dtype and w (N, K) the fp32 master weight."""

    @staticmethod
    def forward(ctx, x, weight):
        x_fp8, x_inv = to_fp8(x, E4M3)
        w_fp8, w_inv = to_fp8(weight, E4M3)
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.out_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        # w_fp8 is (N, K) row-major, so w_fp8.t() is the column-major (K, N) operand the kernel
        # wants
        return scaled_mm(x_fp8, x_inv, w_fp8.t(), w_inv, x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        g_fp8, g_inv = to_fp8(grad_out, E5M2)
        # (M, N) @ (N, K), then (N, M) @ (M, K)
        grad_x = scaled_mm(g_fp8, g_inv, column_major(w_fp8), w_inv, ctx.out_dtype, False)
        g_t = g_fp8.t().contiguous()
        grad_w = scaled_mm(g_t, g_inv, column_major(x_fp8), x_inv, ctx.weight_dtype, False)
        return grad_x, grad_w

class Float8Linear(nn.Linear):
    """Bias-free nn.Linear computing in fp8; shares (does
    not copy) the weight of the layer it replaces."""

    @classmethod
    def from_linear(cls, linear):
        assert linear.bias is None, "Float8Linear supports bias-free layers only (as nanochat's)"
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        return new.train(linear.training)

    def forward(self, x):
        x2d = x.reshape(-1, x.size(-1))
        # the weight gradient multiplies (N, M) @ (M, K) and CUDA's _scaled_mm wants every inner dim
        # divisible by 16
        if torch.is_grad_enabled() and x2d.size(0) % 16:
            raise ValueError(f"fp8 training needs the tokens of a forward (batch x sequence "
                             f"= {x2d.size(0)}) divisible by 16 for torch._scaled_mm; "
                             f"change --device-batch-size or --max-seq-len, or drop --fp8")
        y = Float8Matmul.apply(x2d, self.weight)
        return y.view(*x.shape[:-1], self.out_features)

def check_fp8_supported(device):
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    sm = torch.cuda.get_device_capability(device) if cuda else None
    if sm is None or sm < (8, 9):
        where = f"the model is on {device}" if sm is None else f"this GPU is SM{sm[0]}{sm[1]}"
        raise RuntimeError(f"fp8 training needs a CUDA GPU of compute capability "
                           f">= 8.9 (Ada/Hopper); {where}. Drop --fp8.")

def worth_fp8(linear, fqn=""):
    """The linears fp8 speeds up: dims divisible by 16 (torch._scaled_mm requires it), the smaller
    one >= 128 (the small gates stay bf16)."""
    n_in, n_out = linear.in_features, linear.out_features
    return n_in % 16 == 0 and n_out % 16 == 0 and min(n_in, n_out) >= 128

def convert_to_float8_training(module, module_filter_fn=None):
    """Swap every nn.Linear below `module` for a Float8Linear sharing its weight, when
    module_filter_fn(linear, fully_qualified_name) is true (or always, without a filter). Returns
    `module`."""
    check_fp8_supported(next(module.parameters()).device)
    for prefix, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if type(child) is not Float8Linear and isinstance(child, nn.Linear) \
                    and (module_filter_fn is None or module_filter_fn(child, fqn)):
                setattr(parent, name, Float8Linear.from_linear(child))
    return module

@contextmanager
def float8_disabled(module):
    """Temporarily put back plain (bf16) linears sharing
    the same weights, e.g. for evaluation and sampling."""
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Float8Linear):
                with torch.device("meta"):
                    plain = Linear(child.in_features, child.out_features)
                plain.weight = child.weight
                setattr(parent, name, plain)
                swapped.append((parent, name, child))
    try:
        yield module
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
