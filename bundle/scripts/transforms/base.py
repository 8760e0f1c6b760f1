"""Shared base of the dictionary transforms whose randomness lives in their array transform."""

from __future__ import annotations

from monai.transforms import MapTransform, Randomizable


class DelegatingRandomizabled(Randomizable, MapTransform):
    """A dictionary transform wrapping a randomizable array transform ``self.transform``.

    Seeding the wrapper seeds the array transform, so array and dictionary versions draw the same
    numbers for the same seed.
    """

    def set_random_state(self, seed=None, state=None) -> DelegatingRandomizabled:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.transform.randomize(data)
