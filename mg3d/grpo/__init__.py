"""GRPO for mg3d: the loss maths (`loss`), sampling (`rollout`) and the LightningModule (`module`)."""
