"""A `dask worker --preload` for the sweep tests: on these workers, seed 1's M0 of a sweep named `broken` cannot be
trained (every other model trains as usual), so the test sees what a sweep does when a shared model fails.
Idempotent: Dask may run a preload more than once in one process."""

from permanence.simulation import Simulation


def _fails_for_broken_seed_1(train_initial):
    def train_or_fail(self, *args, **kwargs):
        if self.config.study.startswith("broken-") and self.config.seed == 1:
            raise RuntimeError("injected: this worker cannot train seed 1's M0")
        return train_initial(self, *args, **kwargs)

    train_or_fail.injected_fault = True
    return train_or_fail


if not getattr(Simulation.train_initial, "injected_fault", False):
    Simulation.train_initial = _fails_for_broken_seed_1(Simulation.train_initial)
