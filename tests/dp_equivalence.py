"""Run by torchrun from tests/test_train.py: the same samples as 1 rank x batch 2b or 2 ranks x batch b.

Usage: dp_equivalence.py DATASET OUT_FILE B (the same B for both world sizes). Reads 5 fixed
batches of 2b samples (no mixing, no CFG dropout) once, gives rank r the r-th half when there are
2 ranks, trains 5 steps through the real Trainer (DeepSpeed ZeRO-2 engine, gloo) and writes the
trained parameters (and those it started from) from rank 0.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from selva.mixing import MixConfig
from training.engine import init_world
from training.loader import LoaderConfig, build_loader
from training.train_config import load_config
from training.trainer import Trainer

STEPS = 5


def main() -> None:
    dataset, out_file, b = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = load_config(None, [f"dataset={dataset}", f"out={out_file}.run", "stage=pretrain", f"steps={STEPS}",
                             "mixing.enabled=false", "cfg_dropout=0.0", "ema.enabled=false", "optim.lr=1e-3",
                             "optim.warmup_steps=0", f"loader.batch_size={b}", "loader.num_workers=0"])
    world = init_world(cfg)
    cfg.loader.batch_size = 2 * b // world.world_size  # the engine's micro-batch: b on 2 ranks, 2b on one
    loader = build_loader(dataset, LoaderConfig(batch_size=2 * b, num_workers=0, shuffle_buffer=0, seed=0),
                          mix=MixConfig(prob=0.0))
    it = iter(loader)
    full = [next(it) for _ in range(STEPS)]
    part = slice(world.rank * b, (world.rank + 1) * b) if world.world_size == 2 else slice(0, 2 * b)
    mine = [{k: v[part] for k, v in batch.items() if k != "mix"} for batch in full]
    trainer = Trainer(cfg, world, batches=iter(mine))
    start = {n: p.detach().clone().contiguous() for n, p in trainer.named}
    trainer.run()
    if world.is_main:
        save_file({n: p.detach().clone().contiguous() for n, p in trainer.named}, out_file)
        save_file(start, out_file + ".start")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    import gc

    gc.freeze()  # skip the final collection of torch's and DeepSpeed's objects (seconds per rank; as training.train)
