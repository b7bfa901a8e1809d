"""DDP: `torchrun --nproc_per_node 2` (gloo, CPU) gives the loss curve and weights of one process
with the same global batch (1 process x 2 accumulated micro-batches of 2 == 2 processes x 2).

Tolerance: losses within 1e-5 relative and parameters within 1e-5 absolute, in fp32 (amp off).
The only difference is the order of floating-point sums in the gradient all-reduce. BatchNorm
running statistics are not compared: DDP broadcasts rank 0's buffers each forward, while one
process updates them once per micro-batch (they do not enter the training loss).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    from espmed.data import TrainItem
    from espmed.data.reference import mni152_slices, nuclei_samples
    from espmed.train import parse_config, train

    out, accum = sys.argv[1], int(sys.argv[2])
    cfg = parse_config({
        "model": {"preset": "esp-medsam-tiny", "image_size": 64, "modalities": ["brain-mri", "microscopy"],
                  "controller_map": [0, 1], "num_queries": 3},
        "train": {"out_dir": out, "epochs": 3, "batch_size": 2, "grad_accum": accum, "lr": 3e-3, "amp": "none",
                  "threads": 1, "seed": 5},
    })
    samples = mni152_slices("valid")[4:8] + nuclei_samples("valid")
    summary = train(cfg, [TrainItem(s) for s in samples], show_progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "losses.json"), "w") as fh:
            json.dump(summary, fh)
''')


@pytest.mark.timeout(600)
def test_torchrun_two_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single"), "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path / "ddp"), "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a = json.loads((tmp_path / "single" / "losses.json").read_text())
    b = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert len(a["losses"]) == len(b["losses"]) == 6
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    from espmed.model import load_checkpoint

    pa = dict(load_checkpoint(tmp_path / "single" / "model.safetensors").named_parameters())
    pb = dict(load_checkpoint(tmp_path / "ddp" / "model.safetensors").named_parameters())
    worst = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert worst < 1e-5, f"max |param difference| {worst:.3g}"
