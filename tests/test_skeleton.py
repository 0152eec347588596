"""The meta-device skeleton is safe to load from many threads at once.

Pipeline tasks run in threads, and each loads the skeleton. accelerate's
init_empty_weights patches nn.Module for the whole process; two threads inside it at once
used to leave the patch in place, so every parameter created afterwards (in any test,
any module) silently lived on "meta".
"""

from __future__ import annotations

import threading

import torch
from tiny_models import make_model
from torch import nn

from cospadi.stages.build_block import load_skeleton


def test_concurrent_skeleton_loads_leave_parameters_real(tmp_path) -> None:
    # distinct directories so the per-process cache cannot serialise the loads for us
    dirs = [make_model(tmp_path / f"m{i}", layers=2, seed=i) for i in range(6)]
    barrier = threading.Barrier(len(dirs))
    errors: list[BaseException] = []

    def load(path) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                load_skeleton(path, attn_implementation="eager")
                load_skeleton(path)  # "auto": a second cache entry, another meta build
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=load, args=(d,)) for d in dirs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert nn.Linear(3, 2).weight.device == torch.device("cpu")
    # the skeleton itself stays on meta, with real non-persistent buffers (rotary)
    skeleton = load_skeleton(dirs[0])
    assert all(p.is_meta for p in skeleton.meta_model.parameters())
    assert all(not b.is_meta for b in skeleton.meta_model.buffers())


def test_skeleton_reloaded_when_config_changes(tmp_path) -> None:
    first = load_skeleton(make_model(tmp_path / "m", layers=2))
    assert load_skeleton(tmp_path / "m") is first  # cached
    make_model(tmp_path / "m", layers=3, seed=1)  # rewrites config.json in place
    assert load_skeleton(tmp_path / "m").num_layers == 3
