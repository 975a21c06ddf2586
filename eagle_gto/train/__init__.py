"""Draft-head training: EAGLE-3 with training-time test.

- data.py: jsonl conversations / text -> token ids + loss mask (assistant
  tokens only), optional regeneration of answers by the base model;
- features.py: the target's EAGLE-3 features and logits, on the fly;
- ttt.py: the training-time-test unroll (`unroll`) and its token-level loss
  (`ttt_loss`), reusable by other objectives;
- config.py: `TrainConfig` (every option and default, and its checks);
- head_init.py: a new head's config and first weights, from its base;
- schedule.py: the learning rate of each step and each process's micro-batches;
- trainer.py: the training loop (`train`);
- resume.py: what an EAGLE-3 run's checkpoints record, and the checks of a resumed run;
- checkpoints.py: the checkpoint folders (completion, rotation, refusals)
  EAGLE-3 training and GTO fine-tuning share;
- outputs.py: the files a run writes, checked before it starts;
- errors.py: errors said once under several processes (both trainers);
- processes.py: the processes `accelerate launch` started;
- plot.py: training curves;
- __main__.py: the `python -m eagle_gto.train` CLI.
"""

from .config import TrainConfig
from .data import Sample, collate, read_records, regenerate, to_samples, token_counts
from .features import TargetOutputs, target_outputs
from .head_init import head_config_for, new_head
from .trainer import train
from .ttt import TTTObjective, TTTOutput, step_mask, ttt_loss, unroll

__all__ = ["Sample", "collate", "read_records", "regenerate", "to_samples", "token_counts", "TargetOutputs",
           "target_outputs", "TrainConfig", "head_config_for", "new_head", "train", "TTTObjective", "TTTOutput",
           "step_mask", "ttt_loss", "unroll"]
