"""MGUP-AdamW in a Hugging Face ``Trainer`` with DeepSpeed ZeRO-2, from a DeepSpeed config.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/hf_trainer_deepspeed.py    # CPU, gloo
    deepspeed --num_gpus 8 examples/hf_trainer_deepspeed.py

``configs/deepspeed/hf_zero2.json`` names ``"type": "MGUPAdamW"`` and says ``"auto"`` for what
the Trainer fills in (lr, betas, eps, weight decay, batch sizes, clipping, precision).
``import mgup_dist.deepspeed`` registers the type before the Trainer builds the engine; a
script that must stay unchanged gets the same from ``torchrun -m mgup_dist.run script.py``.

On CPU ranks Accelerate counts one process (``TrainingArguments.world_size == 1``), so the
Trainer would hand every rank the same batches (DeepSpeed still averages the gradients and
shards the optimizer, so the run is correct, but N ranks would see the data of one): this
script gives each CPU rank its own share of the dataset itself.  On GPUs the Trainer does.
"""
import argparse
import os
import pathlib
import tempfile
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import mgup_dist.deepspeed  # noqa: F401  registers the MGUP optimizer types with DeepSpeed

ROOT = pathlib.Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--deepspeed", default=str(ROOT / "configs" / "deepspeed" / "hf_zero2.json"))
p.add_argument("--steps", type=int, default=6)
p.add_argument("--output-dir", default=None, help="default: a temporary directory")
p.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it
args = p.parse_args()
if not torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
    raise SystemExit("hf_trainer_deepspeed.py: on CPU set DS_ACCELERATOR=cpu (DeepSpeed picks its accelerator at import)")

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
data = [{"input_ids": (torch.arange(32) * 7 + i) % 50} for i in range(64)]
for d in data:
    d["labels"] = d["input_ids"].clone()

training_args = TrainingArguments(
    output_dir=args.output_dir or tempfile.mkdtemp(prefix="mgup_hf_ds_"), per_device_train_batch_size=2,
    gradient_accumulation_steps=2, max_steps=args.steps, learning_rate=3e-3, weight_decay=0.05,
    adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
    deepspeed=args.deepspeed, disable_tqdm=True, dataloader_num_workers=0)
if training_args.world_size == 1 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
    # CPU ranks: Accelerate counts one process and would not split the data; split it here
    data = data[torch.distributed.get_rank()::torch.distributed.get_world_size()]
trainer = Trainer(model=model, args=training_args, train_dataset=data)
with warnings.catch_warnings():
    # DeepSpeed 0.19 gathers and reduces with torch.distributed APIs that torch 2.13 deprecates
    # (a FutureWarning on every rank); only those two are silenced
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)
    trainer.train()
engine = trainer.model_wrapped
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
if torch.distributed.get_rank() == 0:
    print(f"hf_trainer_deepspeed: {type(engine.optimizer).__name__} wrapping "
          f"{type(engine.optimizer.optimizer).__name__}, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"after {len(losses)} steps", flush=True)
