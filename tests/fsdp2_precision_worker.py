"""One rank of test_distributed's FSDP2 mixed-precision test (through tests/dist_worker.py, backend fsdp2,
with TOFU_UNLEARN_MIXED_PRECISION=bf16: the GPU path's bf16 on CPU): `... fsdp2_precision_worker.py MODEL`.

A frozen model with the fp32 output head (RKLD's teacher models, and references) is placed with
place_frozen under the launch's FSDP2 policy, and a trained model prepared with its optimizer. Prints
the placed model's logits dtype, their largest difference from the same model in one process (bf16
parameters under the same bf16 autocast, the fp32 head), and the trained model's gradient reduce dtype, and whether gradients are synchronised
after every micro-batch (launch.accumulation_plugin).
"""
import sys

import torch

from harness import launch, models

model_dir = sys.argv[1]
acc = launch.make_accelerator(2, 1)[0]
assert acc.is_fsdp2 and acc.mixed_precision == "bf16", (acc.distributed_type, acc.mixed_precision)
torch.manual_seed(0)
ids = torch.randint(5, 300, (2, 9))


def frozen():
    m = models.load_model(model_dir, frozen=True)[0]  # bf16 weights under mixed precision
    return launch.fp32_output_head(m)


placed = launch.place_frozen(frozen(), acc)
with torch.no_grad():
    got = placed(input_ids=ids).logits
alone = frozen()  # one process: what FSDP2 computes unsharded, bf16 parameters under the same autocast
alone.forward = acc.autocast()(alone.forward)
with torch.no_grad():
    want = alone(input_ids=ids).logits
trained = models.load_model(model_dir, dtype=torch.float32)[0]
trained, _ = acc.prepare(trained, torch.optim.AdamW(trained.parameters(), lr=1e-3))
reduce = trained._get_fsdp_state()._mp_policy.reduce_dtype
print(f"rank {acc.process_index}: logits {got.dtype} diff {(got.float() - want.float()).abs().max().item():.3g} "
      f"reduce {reduce} sync_each_batch {acc.gradient_state.plugin_kwargs.get('sync_each_batch')}", flush=True)
acc.wait_for_everyone()
