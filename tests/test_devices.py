"""A SLURM job of several GPUs running several steps at once: each step claims its own devices
(lmsys.devices.claimed_devices), which its processes then see alone (CUDA_VISIBLE_DEVICES)."""
from __future__ import annotations

import threading
import time

import pytest

from lmsys.devices import claimed_devices


def test_steps_side_by_side_never_share_a_device():
    devices = ["0", "1", "2", "3"]
    held, order = [], []

    def step(n, name, hold_s):
        with claimed_devices(n, devices) as mine:
            order.append((name, "got", tuple(mine)))
            held.append(set(mine))
            assert len(mine) == n and all(not (set(mine) & h) for h in held[:-1] if h)
            time.sleep(hold_s)
            held[held.index(set(mine))] = set()
        order.append((name, "freed", tuple(mine)))

    a = threading.Thread(target=step, args=(2, "a", 0.4))
    b = threading.Thread(target=step, args=(2, "b", 0.4))
    a.start(), b.start()
    time.sleep(0.1)
    c = threading.Thread(target=step, args=(1, "c", 0.0))     # waits: all four are held
    c.start()
    for t in (a, b, c):
        t.join(5)
    got = {name: set(dev) for name, what, dev in order if what == "got"}
    assert got["a"].isdisjoint(got["b"]) and got["a"] | got["b"] == set(devices)
    first_free = min(i for i, (_, what, _) in enumerate(order) if what == "freed")
    assert order.index(next(o for o in order if o[0] == "c")) > first_free     # c started after a device was freed


def test_more_devices_than_the_job_has_is_refused():
    with pytest.raises(ValueError, match="a step of 3 GPUs in a process that sees 2"):
        with claimed_devices(3, ["0", "1"]):
            pass


def test_a_cpu_process_never_shares_gpus():
    from lmsys.steps.recipe import shares_gpus
    assert shares_gpus(1) is False
