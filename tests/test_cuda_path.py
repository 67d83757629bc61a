"""
The multi-GPU process group, checked on CPU: a CUDA run asks torch for NCCL on CUDA tensors AND gloo on CPU ones (NCCL
refuses CPU tensors, and scripts all-reduce small host-built tensors such as SFT's epoch fraction), and 2 real gloo
processes run compute_init's per-device backend string through every kind of collective the scripts use. Also the
fp8 layer's token-count guard for CUDA's _scaled_mm.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import Backend, BackendConfig

from nanochat import common
from nanochat.optim import MuonAdamW

def test_cuda_group_has_nccl_for_cuda_and_gloo_for_cpu_tensors(monkeypatch):
    # compute_init on "cuda" as rank 1 of 2, with the CUDA and process-group calls recorded instead of made
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append(("barrier",)))
    ddp, rank, local_rank, world_size, device = common.compute_init("cuda")
    assert (ddp, rank, local_rank, world_size, device) == (True, 1, 1, 2, torch.device("cuda", 1))
    assert [c[0] for c in calls] == ["set_device", "init", "barrier"]  # NCCL binds the device set before it
    kwargs = calls[1][1]
    assert kwargs["device_id"] == torch.device("cuda", 1)
    # parsed the way init_process_group parses it: which backend carries a tensor of each device type
    assert BackendConfig(Backend(kwargs["backend"])).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}

def test_optimizer_uses_nccl_native_collectives_under_the_mixed_group(monkeypatch):
    # dist.get_backend() returns the whole per-device string; comparing it to "nccl" would send every CUDA step down
    # the gloo fallback (an all_reduce where a reduce_scatter belongs: twice the gradient traffic)
    import nanochat.optim as optim
    monkeypatch.setattr(optim, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    params = [torch.nn.Parameter(torch.zeros(4, 4))]
    group = {"kind": "adamw", "params": params, "lr": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
    for device_type, native in (("cuda", True), ("cpu", False)):
        monkeypatch.setattr(dist, "get_backend", lambda: common.process_group_backend(device_type))
        assert MuonAdamW([dict(group)]).native_collectives is native, device_type

def _worker(rank, world_size, port, out_dir):
    # as torchrun would launch it: the rank in the environment, compute_init builds the group
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    common.compute_init("cpu")
    backend = dist.get_backend()
    progress = torch.tensor(0.25 + 0.5 * rank, dtype=torch.float64)  # chat_sft's epoch_progress: a host tensor
    dist.all_reduce(progress, op=dist.ReduceOp.MIN)
    totals = torch.tensor([rank + 1, 10 * (rank + 1)], dtype=torch.long)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {"rank": rank, "digest": f"d{rank}"})  # chat_rl, checkpoint hashes
    common.compute_cleanup()  # barrier, then destroy
    torch.save({"backend": backend, "progress": progress.item(), "totals": totals.tolist(), "gathered": gathered,
                "initialized_after": dist.is_initialized()}, os.path.join(out_dir, f"rank{rank}.pt"))

def test_two_gloo_ranks_run_every_collective_kind_through_compute_init(tmp_path, free_port):
    mp.spawn(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["backend"] == common.process_group_backend("cpu") == "cpu:gloo"
        assert res["progress"] == 0.25  # MIN over 0.25 and 0.75
        assert res["totals"] == [3, 30]
        assert res["gathered"] == [{"rank": 0, "digest": "d0"}, {"rank": 1, "digest": "d1"}]
        assert res["initialized_after"] is False

def test_fp8_training_forward_names_a_token_count_cuda_cannot_take():
    # CUDA's _scaled_mm needs the weight gradient's inner dim (the M tokens) divisible by 16: say so at the forward,
    # not as a kernel error inside the compiled backward. Inference (no grad: decode, M = 1) is unaffected.
    from nanochat import fp8
    from nanochat.gpt import Linear
    layer = fp8.Float8Linear.from_linear(Linear(64, 32))
    torch.nn.init.normal_(layer.weight, std=0.1)
    with pytest.raises(ValueError, match=r"batch x sequence = 10\) divisible by 16"):
        layer(torch.randn(2, 5, 64))
    with torch.no_grad():
        assert layer(torch.randn(1, 1, 64)).shape == (1, 1, 32)
    assert layer(torch.randn(2, 8, 64)).shape == (2, 8, 32)
