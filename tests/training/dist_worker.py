"""Run by torchrun in test_trainer.py: every rank calls the same train() the flows call."""

import sys
from pathlib import Path

from ktoloop.snapshot import load_snapshot
from train_helpers import allow
from training.config import TrainConfig
from training.reference import load_reference
from training.trainer import train

snapshot_dir, home, out_dir, batch_size = sys.argv[1:5]
config = TrainConfig(method="kto", batch_size=int(batch_size), max_steps=3, lr=1e-2, lora_dropout=0.0, device="cpu")
snapshot = load_snapshot(snapshot_dir)
train(config, snapshot, load_reference("tiny-v1", home), Path(out_dir), cache_dir=Path(out_dir) / "cache",
      decision=allow(snapshot))
