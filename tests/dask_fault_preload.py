"""A `dask worker --preload` for the sweep tests, faults for the sweep named `broken` only (every other sweep trains
as usual): seed 1's M0 cannot be trained, so the test sees what a sweep does when a shared model fails; and the first
update of `broken-static-s0` raises an exception that cannot be pickled (it holds a lock), which Dask could not send
back to the flow as it is. Idempotent: Dask may run a preload more than once in one process."""

import threading

from permanence.simulation import Simulation


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _fails_for_broken_seed_1(train_initial):
    def train_or_fail(self, *args, **kwargs):
        if self.config.study.startswith("broken-") and self.config.seed == 1:
            raise RuntimeError("injected: this worker cannot train seed 1's M0")
        return train_initial(self, *args, **kwargs)

    train_or_fail.injected_fault = True
    return train_or_fail


def _unpicklable_for_broken_static_s0(update):
    def update_or_fail(self, model, version, *args, **kwargs):
        if self.config.study == "broken-static-s0":
            raise HoldsALock(f"injected: update {version} holds a lock")
        return update(self, model, version, *args, **kwargs)

    update_or_fail.injected_fault = True
    return update_or_fail


if not getattr(Simulation.train_initial, "injected_fault", False):
    Simulation.train_initial = _fails_for_broken_seed_1(Simulation.train_initial)
if not getattr(Simulation.update, "injected_fault", False):
    Simulation.update = _unpicklable_for_broken_static_s0(Simulation.update)
