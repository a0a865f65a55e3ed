"""Two gloo processes on the CPU: masks, signs and weights agree on every rank after every step."""

import hashlib
import json
import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rsp.config import resolve
    from rsp.train import Trainer

    cfg = resolve(None, {"epochs": 2, "max_steps": 12, "attack_steps": 1, "batch_size": 64, "device": "cpu"})
    trainer = Trainer(cfg, out_dir, progress=False, log=lambda *_: None)
    sparse = trainer.sparse
    digests = []
    original = sparse.step

    def recording_step(lr, scale):
        original(lr, scale)
        h = hashlib.sha256()
        h.update((sparse.theta > 0).numpy().tobytes())
        h.update(sparse.sign.numpy().tobytes())
        h.update(sparse.theta.numpy().tobytes())
        digests.append(h.hexdigest())

    sparse.step = recording_step
    trainer.fit()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"digests": digests, "active": [int(sparse.active_count())], "budget": sparse.budget}, f)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_ranks_agree_after_every_step(tmp_path):
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0["digests"]) == 12
    assert r0["digests"] == r1["digests"]
    assert r0["active"] == [r0["budget"]]
    assert (tmp_path / "run" / "manifest.json").is_file()
