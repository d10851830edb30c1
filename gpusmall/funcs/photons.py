from .base import ReductionFunction


class Photons(ReductionFunction):
    type = "photons"
