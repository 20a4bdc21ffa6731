"""Training recipes measured on this project's data (BENCHMARKS.md, "quality study").

The paper's defaults (TrainConfig(): lr 1e-5, 10 epochs, batch 64) fit 10 epochs of full GLUE sets on
bert-base. With a few thousand examples — or a profile's few dozen — masks behind a softmax barely move
at 1e-5; the recipes below give each role its own learning rate.
"""

from __future__ import annotations

from xpeft.config import TrainConfig

# GLUE-style tasks with a few thousand training examples: the best of the SST-2 study (BENCHMARKS.md).
TASK_TRAIN = TrainConfig(lr=1e-3, head_lr=1e-3, adapter_lr=1e-3, mask_lr=3e-1, ln_lr=1e-2, epochs=2, batch_size=32)

# One profile of tens of examples in the farm. Mask lr 3e-1: on the news profiles (mtl bank) it took hard masks
# from 0.804 to 0.812 and soft masks from 0.822 to 0.854 mean holdout accuracy over 1e-1 (BENCHMARKS.md, Figure 4).
FARM_TRAIN = TrainConfig(lr=1e-3, head_lr=1e-3, adapter_lr=1e-3, mask_lr=3e-1, ln_lr=1e-1, epochs=10, batch_size=16)
