"""MGUP-AdamW in a Hugging Face ``Trainer``, without DeepSpeed.

    python examples/hf_trainer.py                       # CPU
    torchrun --nproc_per_node 8 examples/hf_trainer.py  # GPUs (the Trainer runs DDP)

``optimizer_cls_and_kwargs`` hands the class to the Trainer, which builds the decay /
no-decay groups from ``TrainingArguments.weight_decay`` and drives its lr schedule from the
``lr`` given here (keep it equal to ``learning_rate``).
"""
import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mgup_dist import MGUPAdamW

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=8)
p.add_argument("--output-dir", default=None, help="default: a temporary directory")
args = p.parse_args()

# A tiny LLaMA (0.1M parameters) and a repeating token pattern it learns in a few steps.
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
data = [{"input_ids": (torch.arange(32) * 7 + i) % 50} for i in range(64)]
for d in data:
    d["labels"] = d["input_ids"].clone()

lr = 3e-3
training_args = TrainingArguments(
    output_dir=args.output_dir or tempfile.mkdtemp(prefix="mgup_hf_"), per_device_train_batch_size=4,
    max_steps=args.steps, learning_rate=lr, weight_decay=0.05, logging_steps=1, save_strategy="no",
    report_to=[], disable_tqdm=True, dataloader_num_workers=0)
trainer = Trainer(model=model, args=training_args, train_dataset=data,
                  optimizer_cls_and_kwargs=(MGUPAdamW, {"lr": lr, "betas": (0.9, 0.95),
                                                        "mask_ratio": 0.5, "alpha": 2.0, "gamma": 0.5}))
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
if trainer.is_world_process_zero():
    print(f"hf_trainer: {type(trainer.optimizer.optimizer).__name__}, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"after {len(losses)} steps", flush=True)
