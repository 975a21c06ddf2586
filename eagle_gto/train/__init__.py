"""Draft-head training: EAGLE-3 with training-time test.

- data.py: jsonl conversations / text -> token ids + loss mask (assistant
  tokens only), optional regeneration of answers by the base model;
- features.py: the target's EAGLE-3 features and logits, on the fly;
- ttt.py: the training-time-test unroll (`unroll`) and its token-level loss
  (`ttt_loss`), reusable by other objectives;
- trainer.py: the training loop and the `python -m eagle_gto.train` CLI;
- checkpoints.py: the checkpoint folders (completion, rotation, refusals)
  EAGLE-3 training and GTO fine-tuning share;
- plot.py: training curves.
"""

from .data import Sample, collate, read_records, regenerate, to_samples, token_counts
from .features import TargetOutputs, target_outputs
from .trainer import TrainConfig, head_config_for, new_head, train
from .ttt import TTTObjective, TTTOutput, step_mask, ttt_loss, unroll

__all__ = ["Sample", "collate", "read_records", "regenerate", "to_samples", "token_counts", "TargetOutputs",
           "target_outputs", "TrainConfig", "head_config_for", "new_head", "train", "TTTObjective", "TTTOutput",
           "step_mask", "ttt_loss", "unroll"]
